-- wrk script for benchmarks/overhead.py: one OpenAI chat completion request, sent again and
-- again on keep-alive connections.
--
--   CHAT_MODEL=fake-model CHAT_KEY=sk-... CHAT_STREAM=0 \
--     wrk -t1 -c32 -d15s --timeout 10s -s benchmarks/loadgen/chat.lua http://127.0.0.1:8000/v1/chat/completions
--
-- Environment (read by every wrk thread and by the summary):
--   CHAT_MODEL       the "model" of the request            (fake-model)
--   CHAT_KEY         sent as "Authorization: Bearer <key>"  (unset: no header)
--   CHAT_STREAM      1: "stream": true; wrk then times the whole SSE answer, not the first
--                    event                                   (0)
--   CHAT_MAX_TOKENS  the "max_tokens" of the request        (16)
--   CHAT_PROMPT      the user message                       (Say hello in one short sentence.)
--
-- The request is the same every time and is set once on wrk.method/body/headers, so no Lua
-- runs per request and wrk's own cost stays as small as it can be. wrk only looks at status
-- codes: any answer outside 2xx/3xx is counted in "status" errors; the caller checks one
-- answer's body itself before measuring.
--
-- When the run ends, done() writes one line of JSON to stdout (after wrk's usual report):
--   {"chat_lua":1,"requests":..,"seconds":..,"rps":..,"p50_ms":..,"p90_ms":..,"p99_ms":..,
--    "p999_ms":..,"mean_ms":..,"max_ms":..,"errors":{"connect":..,"read":..,"write":..,
--    "status":..,"timeout":..},"error_total":..,"request_bytes":..,"stream":..}

local function env(name, default)
  local value = os.getenv(name)
  if value == nil or value == "" then return default end
  return value
end

-- JSON string literal for a plain text value (quotes, backslashes and control characters).
local function quoted(text)
  local escaped = text:gsub('[%c"\\]', function(c)
    if c == '"' then return '\\"' end
    if c == "\\" then return "\\\\" end
    return string.format("\\u%04x", c:byte())
  end)
  return '"' .. escaped .. '"'
end

local stream = env("CHAT_STREAM", "0") == "1"
local key = env("CHAT_KEY", "")
local max_tokens = math.floor(tonumber(env("CHAT_MAX_TOKENS", "16")) or 16)

local body = "{" ..
  '"model":' .. quoted(env("CHAT_MODEL", "fake-model")) .. "," ..
  '"messages":[{"role":"user","content":' .. quoted(env("CHAT_PROMPT", "Say hello in one short sentence.")) .. "}]," ..
  '"max_tokens":' .. max_tokens .. "," ..
  '"stream":' .. (stream and "true" or "false") ..
  "}"

wrk.method = "POST"
wrk.body = body
wrk.headers["Content-Type"] = "application/json"
if stream then
  wrk.headers["Accept"] = "text/event-stream"
else
  wrk.headers["Accept"] = "application/json"
end
if key ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. key
end

function done(summary, latency, requests)
  local seconds = summary.duration / 1000000
  local errs = summary.errors
  local total = errs.connect + errs.read + errs.write + errs.status + errs.timeout
  local function ms(us) return us / 1000 end
  local rps = 0
  if seconds > 0 then rps = summary.requests / seconds end
  local fields = {
    '"chat_lua":1',
    string.format('"requests":%d', summary.requests),
    string.format('"seconds":%.3f', seconds),
    string.format('"rps":%.2f', rps),
    string.format('"p50_ms":%.4f', ms(latency:percentile(50))),
    string.format('"p90_ms":%.4f', ms(latency:percentile(90))),
    string.format('"p99_ms":%.4f', ms(latency:percentile(99))),
    string.format('"p999_ms":%.4f', ms(latency:percentile(99.9))),
    string.format('"mean_ms":%.4f', ms(latency.mean)),
    string.format('"max_ms":%.4f', ms(latency.max)),
    string.format('"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}',
                  errs.connect, errs.read, errs.write, errs.status, errs.timeout),
    string.format('"error_total":%d', total),
    string.format('"request_bytes":%d', #body),
    '"stream":' .. (stream and "true" or "false"),
  }
  io.write("{" .. table.concat(fields, ",") .. "}\n")
end
