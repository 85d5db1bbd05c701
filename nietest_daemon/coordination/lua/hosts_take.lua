-- Take the lease on a host name (coordination/hosts.py, take_lease).
-- KEYS: lease, hosts. ARGV: name, daemon id, record JSON, lease ms, the daemon id it may replace ("": none).
-- Returns {1, previous record or false} when taken, {0, the holder's record or false} when another live
-- daemon holds the name.
local holder = redis.call("get", KEYS[1])
local previous = redis.call("hget", KEYS[2], ARGV[1])
if holder and holder ~= ARGV[2] and holder ~= ARGV[5] then return {0, previous} end
redis.call("set", KEYS[1], ARGV[2], "PX", ARGV[4])
redis.call("hset", KEYS[2], ARGV[1], ARGV[3])
return {1, previous}
