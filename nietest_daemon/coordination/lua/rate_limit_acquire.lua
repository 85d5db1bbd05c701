-- Take a request slot of one webhook (coordination/rate_limit.py, RateLimiter).
-- KEYS[1]: the sorted set of this webhook's recent requests (score = Redis server time in ms).
-- ARGV: per_second, per_minute, second window ms, minute window ms, unique member suffix.
-- Returns 0 when a slot was taken, else how many ms to wait before one may be free.
if redis.replicate_commands then pcall(redis.replicate_commands) end
local key = KEYS[1]
local per_sec, per_min = tonumber(ARGV[1]), tonumber(ARGV[2])
local sec_ms, min_ms = tonumber(ARGV[3]), tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - min_ms)
local total = redis.call('ZCARD', key)
if total >= per_min then
  local e = redis.call('ZRANGE', key, total - per_min, total - per_min, 'WITHSCORES')
  return math.max(1, tonumber(e[2]) + min_ms - now)
end
local recent = redis.call('ZCOUNT', key, '(' .. (now - sec_ms), '+inf')
if recent >= per_sec then
  local e = redis.call('ZRANGE', key, total - per_sec, total - per_sec, 'WITHSCORES')
  return math.max(1, tonumber(e[2]) + sec_ms - now)
end
redis.call('ZADD', key, now, now .. '-' .. ARGV[5])
redis.call('PEXPIRE', key, min_ms + 1000)
return 0
