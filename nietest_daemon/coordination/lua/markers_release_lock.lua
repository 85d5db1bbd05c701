-- Compare-and-delete (coordination/markers.py, release_retry_lock).
-- KEYS: the lock. ARGV: the token it was taken with. Returns 1 if this call released it.
if redis.call("get", KEYS[1]) == ARGV[1] then return redis.call("del", KEYS[1]) end
return 0
