-- Add increments to a host's totals (coordination/counters.py, add_call).
-- KEYS: the totals hash. ARGV: field, amount, field, amount, ...
for i = 1, #ARGV, 2 do
  redis.call("hincrbyfloat", KEYS[1], ARGV[i], ARGV[i + 1])
end
return 0
