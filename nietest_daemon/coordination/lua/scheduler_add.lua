-- Queue subtask ids of a task for a slot (coordination/scheduler.py, Scheduler.add).
-- KEYS: tasks, weights, clock, ready list. ARGV: task, weight, "front"|"back", ids...
-- Returns how many of the task's subtasks wait now.
local ids = {}
for i = 4, #ARGV do ids[#ids + 1] = ARGV[i] end
if #ids > 0 then
  if ARGV[3] == "front" then
    for i = #ids, 1, -1 do redis.call("lpush", KEYS[4], ids[i]) end
  else
    redis.call("rpush", KEYS[4], unpack(ids))
  end
end
if redis.call("llen", KEYS[4]) > 0 then
  if not redis.call("zscore", KEYS[1], ARGV[1]) then
    redis.call("zadd", KEYS[1], tonumber(redis.call("get", KEYS[3]) or "0"), ARGV[1])
  end
  redis.call("hset", KEYS[2], ARGV[1], ARGV[2])
end
return redis.call("llen", KEYS[4])
