-- End a takeover (coordination/hosts.py, finish_takeover): the lost host's work is handed back.
-- KEYS: hosts, the host's takeover lock. ARGV: name, the taker's daemon id.
-- Returns 1; 0 when this taker no longer holds the lock (it lapsed and another resumed the hand-back).
if redis.call("get", KEYS[2]) ~= ARGV[2] then return 0 end
local raw = redis.call("hget", KEYS[1], ARGV[1])
if raw then
  local record = cjson.decode(raw)
  if record["state"] == "lost" then
    record["handed_back"] = true
    redis.call("hset", KEYS[1], ARGV[1], cjson.encode(record))
  end
end
redis.call("del", KEYS[2])
return 1
