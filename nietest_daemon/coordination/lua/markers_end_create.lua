-- Release the creating lock if its owner still holds it (coordination/markers.py, end_create).
-- KEYS: creating lock, create-sent marker, poll chain. ARGV: owner, clear the marker (1/0),
-- poll message id ("": none), chain TTL.
if ARGV[2] == "1" then redis.call("del", KEYS[2]) end
if ARGV[3] ~= "" then redis.call("set", KEYS[3], ARGV[3], "EX", ARGV[4]) end
if redis.call("get", KEYS[1]) == ARGV[1] then return redis.call("del", KEYS[1]) end
return 0
