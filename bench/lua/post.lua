-- Keyed POSTs: every request carries a unique Idempotency-Key (run nonce, thread id,
-- per-thread counter and a random number), so the sidecar never replays: each request
-- is a claim, an upstream call and a completion. The harness sets `nonce` above this.
thread_id = 0
local counter = 0
local body = '{"restaurant_id":1,"items":[{"id":7,"qty":2}],"amount":1250}'
local headers = {}

function setup(thread)
  _next_id = (_next_id or 0) + 1
  thread:set("thread_id", _next_id)
end

function init(args)
  math.randomseed(os.time() + thread_id * 7919)
  headers["Content-Type"] = "application/json"
end

function request()
  counter = counter + 1
  headers["Idempotency-Key"] = string.format(
    "%s-%d-%d-%08x", nonce, thread_id, counter, math.random(0, 0x7fffffff))
  return wrk.format("POST", nil, headers, body)
end
