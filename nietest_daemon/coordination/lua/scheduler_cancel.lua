-- Drop a task's ready list, its entry and its slot holders (coordination/scheduler.py, Scheduler.cancel).
-- KEYS: holders, tasks, weights, ready list. ARGV: task, holder prefix ("<task>:").
-- Returns {ready entries dropped, holders dropped}.
local dropped = redis.call("llen", KEYS[4])
redis.call("del", KEYS[4])
redis.call("zrem", KEYS[2], ARGV[1])
redis.call("hdel", KEYS[3], ARGV[1])
local released = 0
local prefix = ARGV[2]
for _, member in ipairs(redis.call("zrange", KEYS[1], 0, -1)) do
  if string.sub(member, 1, #prefix) == prefix then
    redis.call("zrem", KEYS[1], member)
    released = released + 1
  end
end
return {dropped, released}
