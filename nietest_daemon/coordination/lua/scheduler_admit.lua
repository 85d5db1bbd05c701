-- Fill the free slots fairly: stride scheduling on two levels, owners then each owner's tasks
-- (coordination/scheduler.py, Scheduler.admit).
-- KEYS: holders, owners, owner weights, owner clock, task clocks, task -> owner, task weights,
-- admitted (not started), admitter.
-- ARGV: cap, now, lease expiry, ready-list prefix, owner-task-set prefix, limit (0: none),
-- a holder to release first ("": none), this host, the admission time before which a run that has
-- not started is sent again, how many of those at most.
-- Returns {the admitted ids, in order; the ids whose run message must be sent again}.
local holders, owners, owner_weights, owner_clock, task_clocks, task_owner, weights, admitted_set, admitter =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local now, host = ARGV[2], ARGV[8]

-- The task leaves its owner's set; an owner left without a task leaves the lane; a lane left
-- without an owner forgets its clock. So a drained lane leaves no key but its holders.
local function leave(task, owner)
  local tasks = ARGV[5] .. owner
  redis.call("zrem", tasks, task)
  redis.call("hdel", task_owner, task)
  redis.call("hdel", weights, task)
  if redis.call("zcard", tasks) == 0 then
    redis.call("zrem", owners, owner)
    redis.call("hdel", owner_weights, owner)
    redis.call("hdel", task_clocks, owner)
    if redis.call("zcard", owners) == 0 then redis.call("del", owner_clock) end
  end
end

if ARGV[7] ~= "" then
  redis.call("zrem", holders, ARGV[7])
  redis.call("zrem", admitted_set, ARGV[7])
  redis.call("hdel", admitter, ARGV[7])
end
redis.call("zremrangebyscore", holders, "-inf", now)
local free = tonumber(ARGV[1]) - redis.call("zcard", holders)
local limit = tonumber(ARGV[6])
if limit > 0 and limit < free then free = limit end
local admitted = {}
while free > 0 do
  local head = redis.call("zrange", owners, 0, 0, "WITHSCORES")
  if #head == 0 then break end
  local owner, owner_pass = head[1], head[2]
  local first = redis.call("zrange", ARGV[5] .. owner, 0, 0, "WITHSCORES")
  if #first == 0 then -- an owner without a task (no script leaves one): it leaves
    redis.call("zrem", owners, owner)
    redis.call("hdel", owner_weights, owner)
    redis.call("hdel", task_clocks, owner)
  else
    local task, task_pass = first[1], first[2]
    local ready = ARGV[4] .. task
    local id = redis.call("lpop", ready)
    if id then
      redis.call("zadd", holders, ARGV[3], id)
      redis.call("zadd", admitted_set, now, id)
      redis.call("hset", admitter, id, host)
      redis.call("set", owner_clock, owner_pass)
      redis.call("hset", task_clocks, owner, task_pass)
      admitted[#admitted + 1] = id
      free = free - 1
    end
    if redis.call("llen", ready) == 0 then
      leave(task, owner)
    elseif id then
      local weight = tonumber(redis.call("hget", weights, task) or "1")
      redis.call("zadd", ARGV[5] .. owner, tonumber(task_pass) + 1 / weight, task)
    end
    if id and redis.call("zscore", owners, owner) then
      local weight = tonumber(redis.call("hget", owner_weights, owner) or "1")
      redis.call("zadd", owners, tonumber(owner_pass) + 1 / weight, owner)
    end
  end
end
if redis.call("zcard", owners) == 0 then redis.call("del", owner_clock) end
-- Admitted long ago and not started: the sender died, or the reply of its admission was lost,
-- before the run message went out. Sent again (a copy finds its subtask's markers, harmless); one
-- whose slot lapsed meanwhile is forgotten (the sweep's repair puts it back in line).
local resend = {}
for _, id in ipairs(redis.call("zrangebyscore", admitted_set, "-inf", ARGV[9], "LIMIT", 0, tonumber(ARGV[10]))) do
  if redis.call("zscore", holders, id) then
    redis.call("zadd", admitted_set, now, id)
    redis.call("hset", admitter, id, host)
    resend[#resend + 1] = id
  else
    redis.call("zrem", admitted_set, id)
    redis.call("hdel", admitter, id)
  end
end
return {admitted, resend}
