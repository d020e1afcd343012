"""A stand-in for Claude Code's start-up and first model request, for the
agent-profile tests: like the real CLI it refuses to start without a
credential variable, reads ANTHROPIC_BASE_URL, and sends its key as
x-api-key. Prints what it saw, one `tag value` line each."""
import http.client
import json
import os
import sys
import urllib.parse

key = os.environ.get("ANTHROPIC_API_KEY") or os.environ.get("ANTHROPIC_AUTH_TOKEN")
if not key:
    print("Not logged in · Please run /login", file=sys.stderr)
    sys.exit(1)
base = os.environ.get("ANTHROPIC_BASE_URL", "https://api.anthropic.com")
u = urllib.parse.urlparse(base)
if u.hostname != "127.0.0.1":
    print("would-call", base)
    sys.exit(2)
body = json.dumps({"model": "claude-stand-in", "max_tokens": 8,
                   "messages": [{"role": "user", "content": "hi"}]})
c = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
c.request("POST", u.path + "/v1/messages", body=body,
          headers={"x-api-key": key, "anthropic-version": "2023-06-01",
                   "content-type": "application/json"})
r = c.getresponse()
print("key", key)
print("status", r.status, r.read().decode())
print("traffic", os.environ.get("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "-"))
