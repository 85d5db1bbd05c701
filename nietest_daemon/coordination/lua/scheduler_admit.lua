-- Fill the free slots fairly: stride scheduling (coordination/scheduler.py, Scheduler.admit).
-- KEYS: holders, tasks, weights, clock. ARGV: cap, now, lease expiry, ready prefix, limit (0: none),
-- a holder to release first ("": none). Returns the admitted ids, in order.
if ARGV[6] ~= "" then redis.call("zrem", KEYS[1], ARGV[6]) end
redis.call("zremrangebyscore", KEYS[1], "-inf", ARGV[2])
local free = tonumber(ARGV[1]) - redis.call("zcard", KEYS[1])
local limit = tonumber(ARGV[5])
if limit > 0 and limit < free then free = limit end
local admitted = {}
while free > 0 do
  local head = redis.call("zrange", KEYS[2], 0, 0, "WITHSCORES")
  if #head == 0 then break end
  local task, pass = head[1], tonumber(head[2])
  local ready = ARGV[4] .. task
  local id = redis.call("lpop", ready)
  if id then
    redis.call("zadd", KEYS[1], ARGV[3], id)
    redis.call("set", KEYS[4], head[2])
    admitted[#admitted + 1] = id
    free = free - 1
  end
  if redis.call("llen", ready) == 0 then
    redis.call("zrem", KEYS[2], task)
    redis.call("hdel", KEYS[3], task)
  elseif id then
    local weight = tonumber(redis.call("hget", KEYS[3], task) or "1")
    redis.call("zadd", KEYS[2], pass + 1 / weight, task)
  end
end
return admitted
