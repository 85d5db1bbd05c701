-- Remove from an ack set the ids with no body in the queue's hash; return them
-- (internals/dramatiq_redis.py, NietestRedisConsumer._release_orphans). One script, so an id acked
-- by a worker thread meanwhile is never mistaken for one without a body.
-- KEYS: the ack set, the bodies hash.
local released = {}
for _, id in ipairs(redis.call("smembers", KEYS[1])) do
    if redis.call("hexists", KEYS[2], id) == 0 then
        redis.call("srem", KEYS[1], id)
        table.insert(released, id)
    end
end
return released
