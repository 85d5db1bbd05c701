-- Renew or take a slot (coordination/scheduler.py, Scheduler.hold).
-- KEYS: holders, admitted (not started), admitter. ARGV: member, cap, now, lease expiry.
-- 1: it holds a slot (renewed or taken). Either way its run has started: no longer "admitted".
redis.call("zrem", KEYS[2], ARGV[1])
redis.call("hdel", KEYS[3], ARGV[1])
redis.call("zremrangebyscore", KEYS[1], "-inf", ARGV[3])
if redis.call("zscore", KEYS[1], ARGV[1]) or redis.call("zcard", KEYS[1]) < tonumber(ARGV[2]) then
  redis.call("zadd", KEYS[1], ARGV[4], ARGV[1])
  return 1
end
return 0
