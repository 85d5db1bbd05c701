-- Claim the takeover of a lost host (coordination/hosts.py, claim_takeover): exactly one daemon wins.
-- KEYS: hosts, the host's lease, its lifelines, its takeover lock.
-- ARGV: name, the claimer's daemon id, the claimer's host name, lost seconds, takeover lock ms.
-- A host is lost when its lease lapsed and its newest lifeline is older than `lost seconds` (by this
-- server's clock). Returns {"new", record JSON} when this call declared it lost, {"resume", record
-- JSON} when it takes over a hand-back whose taker vanished (its lock lapsed), else false.
local raw = redis.call("hget", KEYS[1], ARGV[1])
if not raw then return false end
local record = cjson.decode(raw)
local t = redis.call("time")
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
if record["state"] == "up" then
  if redis.call("exists", KEYS[2]) == 1 then return false end
  local top = redis.call("zrevrange", KEYS[3], 0, 0, "withscores")
  local last = tonumber(top[2] or record["since"] or 0)
  if last > now - tonumber(ARGV[4]) then return false end
  record["state"] = "lost"
  record["epoch"] = (tonumber(record["epoch"]) or 0) + 1
  record["last_seen"] = last
  record["since"] = now
  record["handed_back"] = false
  record["taken_over_by"] = ARGV[3]
  redis.call("set", KEYS[4], ARGV[2], "PX", ARGV[5])
  raw = cjson.encode(record)
  redis.call("hset", KEYS[1], ARGV[1], raw)
  return {"new", raw}
end
if record["state"] == "lost" and not record["handed_back"] then
  if not redis.call("set", KEYS[4], ARGV[2], "NX", "PX", ARGV[5]) then return false end
  record["taken_over_by"] = ARGV[3]
  raw = cjson.encode(record)
  redis.call("hset", KEYS[1], ARGV[1], raw)
  return {"resume", raw}
end
return false
