-- POST the body in $BODY_FILE with $CONTENT_TYPE on every request (wrk's closed loop).
-- $EXTRA_HEADERS, if set, adds headers, one "Name: value" a line (e.g. the binary tensor
-- extension's "Inference-Header-Content-Length: 123").
local f = assert(io.open(os.getenv("BODY_FILE"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = os.getenv("CONTENT_TYPE") or "application/json"
for line in (os.getenv("EXTRA_HEADERS") or ""):gmatch("[^\r\n]+") do
  local name, value = line:match("^%s*([^:]-)%s*:%s*(.-)%s*$")
  if name and name ~= "" then
    wrk.headers[name] = value
  end
end
