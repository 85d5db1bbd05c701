-- Renew or take a slot (coordination/scheduler.py, Scheduler.hold).
-- KEYS: holders. ARGV: member, cap, now, lease expiry. 1: it holds a slot (renewed or taken).
redis.call("zremrangebyscore", KEYS[1], "-inf", ARGV[3])
if redis.call("zscore", KEYS[1], ARGV[1]) or redis.call("zcard", KEYS[1]) < tonumber(ARGV[2]) then
  redis.call("zadd", KEYS[1], ARGV[4], ARGV[1])
  return 1
end
return 0
