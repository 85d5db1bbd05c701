-- Renew a daemon's lease on its host name, once a second (coordination/hosts.py, renew_lease).
-- KEYS: lease, hosts. ARGV: name, daemon id, lease ms.
-- Returns "ok"; "fenced" when the host was declared lost meanwhile (its work was handed back: the
-- daemon must restart its workers before it renews again); "taken" when another daemon holds the
-- name; "unregistered" when the broker has no record of it (a broker that lost its data).
local holder = redis.call("get", KEYS[1])
if holder == ARGV[2] then
  redis.call("pexpire", KEYS[1], ARGV[3])
  return "ok"
end
local raw = redis.call("hget", KEYS[2], ARGV[1])
if not raw then return "unregistered" end
local record = cjson.decode(raw)
if holder or record["daemon_id"] ~= ARGV[2] then return "taken" end
if record["state"] ~= "up" then return "fenced" end
-- The lease lapsed (a broker restart, a cut shorter than the takeover) but nobody took the host over.
redis.call("set", KEYS[1], ARGV[2], "PX", ARGV[3])
return "ok"
