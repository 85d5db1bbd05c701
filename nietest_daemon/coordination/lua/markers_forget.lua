-- Delete every key given (coordination/markers.py, forget_markers_call).
-- KEYS: the keys to delete. Returns how many existed.
return redis.call("del", unpack(KEYS))
