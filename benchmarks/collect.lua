-- wrk script for benchmarks/collect.py: POSTs Segment calls with keep-alive connections.
-- Arguments (after `--`): path, Basic credentials (base64), events per request (1: a single
-- call, else a batch). Each thread builds 1,000 requests up front (distinct messageIds and
-- users, ~10k users, track events shaped like analytics.js's) and cycles through them, so
-- wrk spends its time sending, not building. done() prints one line the benchmark parses:
-- RESULT requests duration_us bad errors p50_us p99_us (bad: an answer other than 200, or a 200 that
-- lists rejected events).
local requests, nth = {}, 0
bad = 0 -- a global: done() reads it from each thread
local threads = {}

local NAMES = {"Product Viewed", "Product Added", "Order Completed", "Email Opened", "Video Played"}
local UA = "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_4) AppleWebKit/605.1.15 Version/17.4 Safari"
local EVENT = '{"type":"track","event":"%s","userId":"u%d","messageId":"%s-%d",'
  .. '"timestamp":"%s","properties":{"product_id":"sku-%d","price":%d.%02d,'
  .. '"currency":"EUR","quantity":%d},"context":{"library":{"name":"analytics.js",'
  .. '"version":"5.2.0"},"locale":"en-US","userAgent":"' .. UA .. '","page":'
  .. '{"path":"/p/sku-%d","referrer":"https://www.google.com/"}}}'

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  local path, credentials, per = args[1], args[2], tonumber(args[3])
  math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16))
  local prefix = string.format("wrk%08x", math.random(0, 0x7fffffff))
  local ts = os.date("!%Y-%m-%dT%H:%M:%S.000Z")
  local headers = {["Authorization"] = "Basic " .. credentials,
                   ["Content-Type"] = "application/json"}
  local serial = 0
  local function event()
    serial = serial + 1
    local sku = math.random(0, 99999)
    return string.format(EVENT, NAMES[math.random(1, #NAMES)], math.random(0, 9999), prefix,
      serial, ts, sku, math.random(5, 499), math.random(0, 99), math.random(1, 3), sku)
  end
  for r = 1, 1000 do
    local body
    if per > 1 then
      local events = {}
      for e = 1, per do events[e] = event() end
      body = '{"batch":[' .. table.concat(events, ",") .. "]}"
    else
      body = event()
    end
    requests[r] = wrk.format("POST", path, headers, body)
  end
end

function request()
  nth = nth % #requests + 1
  return requests[nth]
end

function response(status, headers, body)
  if status ~= 200 or body:find("rejected", 1, true) then
    bad = bad + 1
  end
end

function done(summary, latency, _)
  local total = 0
  for _, thread in ipairs(threads) do
    total = total + thread:get("bad")
  end
  local e = summary.errors
  io.write(string.format("RESULT %d %d %d %d %d %d\n", summary.requests, summary.duration, total,
    e.connect + e.read + e.write + e.timeout, latency:percentile(50), latency:percentile(99)))
end
