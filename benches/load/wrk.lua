-- wrk script for benches/load.sh. Configured by environment variables:
--   BENCH_MODE     hit | miss | mixed | many
--                  hit   : GET /api/v1/accounts/{A}/conversations/{c}           (cached route)
--                  miss  : GET /api/v1/accounts/{A}/conversations/{c}/messages  (forwarded route)
--                  mixed : 90% hit paths, every 10th request a miss path
--                  many  : hit paths, BENCH_TOKENS tokens x BENCH_CONVS conversations
--   BENCH_TOKENS   number of distinct api_access_token values (default 1)
--   BENCH_CONVS    number of conversations cycled (default 100)
--   BENCH_ACCOUNT  account id (default 1)
--   BENCH_ACCEPT_ENCODING  sent as Accept-Encoding when set (e.g. "gzip": a gzip client's hit)
-- Every response is checked: a status other than 200, an empty 200 body, or a 200 in the wrong
-- coding (Content-Encoding other than gzip for a gzip client, any Content-Encoding for the
-- others) is counted and reported, so a broken setup cannot pass for a fast one. done() prints
-- one line "BENCH_JSON {...}" with requests, duration, errors, p50/p99, the status counts and
-- the smallest and largest 200 body.

local mode = os.getenv("BENCH_MODE") or "hit"
local ntokens = tonumber(os.getenv("BENCH_TOKENS") or "1")
local nconvs = tonumber(os.getenv("BENCH_CONVS") or "100")
local account = tonumber(os.getenv("BENCH_ACCOUNT") or "1")
local accept_encoding = os.getenv("BENCH_ACCEPT_ENCODING")
-- the Content-Encoding every 200 must carry (nil: none)
local want_encoding = nil
if accept_encoding and string.find(string.lower(accept_encoding), "gzip", 1, true) then
  want_encoding = "gzip"
end

local threads = {}
local next_id = 0

function setup(thread)
  thread:set("tid", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end

local function token(i)
  -- 24 visible ASCII characters, like Chatwoot's base58 tokens
  return string.format("bench%019d", i)
end

local reqs = {}
local nreqs = 0
local idx = 0

-- per-thread counters (read by done() through thread:get)
non200 = 0
empty200 = 0
wrong_encoding = 0
min_body = -1
max_body = 0
responses = 0
statuses = ""
xcache = ""
local status_counts = {}
local xcache_counts = {}

function init(args)
  local function path(c, messages)
    local p = string.format("/api/v1/accounts/%d/conversations/%d", account, c)
    if messages then p = p .. "/messages" end
    return p
  end
  local function add(p, t)
    nreqs = nreqs + 1
    local headers = { ["api_access_token"] = token(t) }
    if accept_encoding and accept_encoding ~= "" then
      headers["Accept-Encoding"] = accept_encoding
    end
    reqs[nreqs] = wrk.format("GET", p, headers)
  end
  if mode == "mixed" then
    -- 10 consecutive requests: 9 conversation paths then one messages path
    local k = 0
    for c = 1, nconvs do
      for t = 1, ntokens do
        k = k + 1
        add(path(c, k % 10 == 0), t)
      end
    end
  else
    for c = 1, nconvs do
      for t = 1, ntokens do
        add(path(c, mode == "miss"), t)
      end
    end
  end
  -- threads start at different offsets of the same cycle
  idx = ((tid or 0) * 7919) % nreqs
end

function request()
  idx = idx + 1
  if idx > nreqs then idx = 1 end
  return reqs[idx]
end

function response(status, headers, body)
  responses = responses + 1
  if status ~= 200 then
    non200 = non200 + 1
    status_counts[status] = (status_counts[status] or 0) + 1
    statuses = serialise(status_counts)
    return
  elseif body == nil or #body == 0 then
    empty200 = empty200 + 1
  else
    local n = #body
    if min_body < 0 or n < min_body then min_body = n end
    if n > max_body then max_body = n end
  end
  if (headers["content-encoding"] or headers["Content-Encoding"]) ~= want_encoding then
    wrong_encoding = wrong_encoding + 1
  end
  status_counts[status] = (status_counts[status] or 0) + 1
  local xc = headers["x-cache"] or headers["X-Cache"] or "-"
  xcache_counts[xc] = (xcache_counts[xc] or 0) + 1
  if responses % 1000 == 0 then
    -- keep the serialised counters current for done(); cheap enough every 1000 responses
    statuses = serialise(status_counts)
    xcache = serialise(xcache_counts)
  end
end

function serialise(t)
  local parts = {}
  for k, v in pairs(t) do
    table.insert(parts, string.format("\"%s\":%d", tostring(k), v))
  end
  return "{" .. table.concat(parts, ",") .. "}"
end

local function merge(acc, s)
  -- s is a flat {"k":n,...} string made by serialise()
  if s == nil then return end
  for k, v in string.gmatch(s, "\"([^\"]*)\":(%d+)") do
    acc[k] = (acc[k] or 0) + tonumber(v)
  end
end

function done(summary, latency, requests)
  local total_non200, total_empty, total_resp, total_wrong = 0, 0, 0, 0
  local lo, hi = -1, 0
  local st, xc = {}, {}
  for _, t in ipairs(threads) do
    total_non200 = total_non200 + (t:get("non200") or 0)
    total_empty = total_empty + (t:get("empty200") or 0)
    total_wrong = total_wrong + (t:get("wrong_encoding") or 0)
    local tlo, thi = t:get("min_body") or -1, t:get("max_body") or 0
    if tlo >= 0 and (lo < 0 or tlo < lo) then lo = tlo end
    if thi > hi then hi = thi end
    total_resp = total_resp + (t:get("responses") or 0)
    merge(st, t:get("statuses"))
    merge(xc, t:get("xcache"))
  end
  local e = summary.errors
  io.write(string.format(
    "BENCH_JSON {\"mode\":\"%s\",\"requests\":%d,\"duration_us\":%d,\"bytes\":%d," ..
    "\"errors\":{\"connect\":%d,\"read\":%d,\"write\":%d,\"status\":%d,\"timeout\":%d}," ..
    "\"non200\":%d,\"empty200\":%d,\"wrong_encoding\":%d,\"responses\":%d," ..
    "\"min_body\":%d,\"max_body\":%d," ..
    "\"p50_us\":%d,\"p90_us\":%d,\"p99_us\":%d,\"max_us\":%d," ..
    "\"statuses_sampled\":%s,\"x_cache_sampled\":%s}\n",
    mode, summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    total_non200, total_empty, total_wrong, total_resp, math.max(lo, 0), hi,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    serialise(st), serialise(xc)))
end
