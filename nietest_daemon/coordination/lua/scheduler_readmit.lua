-- The admissions of a lost host whose run has not started, taken over to be sent again
-- (coordination/scheduler.py, Scheduler.take_admissions).
-- KEYS: holders, admitted (not started), admitter. ARGV: the lost host, this host, now.
-- Returns the ids whose run message must be sent again (those still holding their slot).
local holders, admitted, admitter = KEYS[1], KEYS[2], KEYS[3]
local resend = {}
for _, id in ipairs(redis.call("zrange", admitted, 0, -1)) do
  if redis.call("hget", admitter, id) == ARGV[1] then
    local lease = redis.call("zscore", holders, id)
    if lease and tonumber(lease) > tonumber(ARGV[3]) then
      redis.call("zadd", admitted, ARGV[3], id)
      redis.call("hset", admitter, id, ARGV[2])
      resend[#resend + 1] = id
    else
      redis.call("zrem", admitted, id)
      redis.call("hdel", admitter, id)
    end
  end
end
return resend
