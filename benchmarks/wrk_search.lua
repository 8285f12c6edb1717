-- wrk script of benchmarks/serve.py: POST /api/search with the multipart bodies serve.py wrote.
--   wrk -t1 -c16 -d10s -s benchmarks/wrk_search.lua http://127.0.0.1:PORT -- BODY_DIR COUNT BOUNDARY
-- Each request is made once, in init (wrk's advice for a cheap client); done() prints one JSON line.

local requests, count, next_one = {}, 0, 0

function init(args)
  local dir, boundary = args[1], args[3]
  count = tonumber(args[2])
  wrk.headers["Content-Type"] = "multipart/form-data; boundary=" .. boundary
  for k = 1, count do
    local f = assert(io.open(string.format("%s/%04d.body", dir, k - 1), "rb"))
    requests[k] = wrk.format("POST", "/api/search", nil, f:read("*a"))
    f:close()
  end
  next_one = math.random(count) - 1 -- threads start at different images
end

function request()
  next_one = next_one % count + 1
  return requests[next_one]
end

function done(summary, latency, _)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "status_errors": %d, "socket_errors": %d, "p50_us": %d, "p99_us": %d}\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
