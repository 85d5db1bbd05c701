-- Queue subtask ids of a task for a slot, under its owner (coordination/scheduler.py, Scheduler.add).
-- KEYS: owners, owner weights, owner clock, task clocks, task -> owner, task weights, the task's ready
-- list, the owner's task set. ARGV: task, task weight, owner, owner weight, "front"|"back",
-- owner-task-set prefix, ids... Returns how many of the task's subtasks wait now.
local owners, owner_weights, owner_clock, task_clocks, task_owner, weights, ready, tasks =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local task, owner = ARGV[1], ARGV[3]
local ids = {}
for i = 7, #ARGV do ids[#ids + 1] = ARGV[i] end
if #ids > 0 then
  if ARGV[5] == "front" then
    for i = #ids, 1, -1 do redis.call("lpush", ready, ids[i]) end
  else
    redis.call("rpush", ready, unpack(ids))
  end
end
local waiting = redis.call("llen", ready)
if waiting > 0 then
  local before = redis.call("hget", task_owner, task)
  if before and before ~= owner then -- a new owner (a reload changed the mode or the task): move it
    local old = ARGV[6] .. before
    redis.call("zrem", old, task)
    if redis.call("zcard", old) == 0 then
      redis.call("zrem", owners, before)
      redis.call("hdel", owner_weights, before)
      redis.call("hdel", task_clocks, before)
    end
  end
  -- a newly active owner starts at the pass of the owner admitted last, a newly active task at
  -- the pass of its owner's task admitted last: neither jumps ahead nor waits behind old credit
  if not redis.call("zscore", owners, owner) then
    redis.call("zadd", owners, redis.call("get", owner_clock) or "0", owner)
  end
  if not redis.call("zscore", tasks, task) then
    redis.call("zadd", tasks, redis.call("hget", task_clocks, owner) or "0", task)
  end
  redis.call("hset", owner_weights, owner, ARGV[4])
  redis.call("hset", task_owner, task, owner)
  redis.call("hset", weights, task, ARGV[2])
end
return waiting
