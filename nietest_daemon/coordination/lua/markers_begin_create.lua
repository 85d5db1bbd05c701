-- Take the creating lock and claim the create-sent marker (coordination/markers.py, begin_create_call).
-- KEYS: creating lock, create-sent marker. ARGV: owner, lock TTL, process token, marker TTL.
-- Returns 1 (locked and claimed), 2 (locked, an earlier create in doubt) or 0 (busy).
local holder = redis.call("get", KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call("set", KEYS[1], ARGV[1], "EX", ARGV[2])
if redis.call("set", KEYS[2], ARGV[3], "NX", "EX", ARGV[4]) then return 1 end
return 2
