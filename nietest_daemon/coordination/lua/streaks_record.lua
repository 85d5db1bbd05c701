-- Record one subtask outcome on a queue's failure streak (coordination/streaks.py, record).
-- KEYS: streak hash, errors list, events list. ARGV: ok ("1"/"0"), error text, threshold, now,
-- queue, max events. Returns the current run of consecutive failures.
local key, errs, events = KEYS[1], KEYS[2], KEYS[3]
local ok, err, threshold, now, queue, max_events = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5], ARGV[6]
if ok == "1" then
  local n = tonumber(redis.call("hget", key, "failures") or "0")
  redis.call("hset", key, "failures", 0, "last_success_at", now)
  if n >= threshold then
    redis.call("rpush", events, cjson.encode({kind="recovered", queue=queue, failures=n, at=tonumber(now)}))
    redis.call("ltrim", events, -tonumber(max_events), -1)
  end
  redis.call("del", errs)
  return 0
end
local n = redis.call("hincrby", key, "failures", 1)
redis.call("hset", key, "last_failure_at", now)
redis.call("lpush", errs, err)
redis.call("ltrim", errs, 0, 99)
if n == threshold then
  local errors = redis.call("lrange", errs, 0, 99)
  redis.call("rpush", events, cjson.encode({kind="failure_run", queue=queue, failures=n, errors=errors,
                                             at=tonumber(now)}))
  redis.call("ltrim", events, -tonumber(max_events), -1)
end
return n
