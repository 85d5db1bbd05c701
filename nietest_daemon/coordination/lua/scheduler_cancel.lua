-- Drop a task's ready list, its place under its owner and its slot holders
-- (coordination/scheduler.py, Scheduler.cancel).
-- KEYS: holders, owners, owner weights, owner clock, task clocks, task -> owner, task weights, the
-- task's ready list, admitted (not started), admitter. ARGV: task, holder prefix ("<task>:"), owner-task-set prefix.
-- Returns {ready entries dropped, holders dropped}.
local holders, owners, owner_weights, owner_clock, task_clocks, task_owner, weights, ready, admitted, admitter =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10]
local task = ARGV[1]
local dropped = redis.call("llen", ready)
redis.call("del", ready)
local owner = redis.call("hget", task_owner, task)
if owner then
  local tasks = ARGV[3] .. owner
  redis.call("zrem", tasks, task)
  if redis.call("zcard", tasks) == 0 then
    redis.call("zrem", owners, owner)
    redis.call("hdel", owner_weights, owner)
    redis.call("hdel", task_clocks, owner)
    if redis.call("zcard", owners) == 0 then redis.call("del", owner_clock) end
  end
end
redis.call("hdel", task_owner, task)
redis.call("hdel", weights, task)
local released = 0
local prefix = ARGV[2]
for _, member in ipairs(redis.call("zrange", holders, 0, -1)) do
  if string.sub(member, 1, #prefix) == prefix then
    redis.call("zrem", holders, member)
    released = released + 1
  end
end
for _, member in ipairs(redis.call("zrange", admitted, 0, -1)) do
  if string.sub(member, 1, #prefix) == prefix then
    redis.call("zrem", admitted, member)
    redis.call("hdel", admitter, member)
  end
end
return {dropped, released}
