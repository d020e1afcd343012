"""The demo agent: asks its model one question through the LLM relay, the
way an SDK would (POST $ANTHROPIC_BASE_URL/v1/messages, streamed), and
prints the answer as it arrives. It holds no key."""
import http.client
import json
import os
import sys
import urllib.parse

url = urllib.parse.urlparse(os.environ["ANTHROPIC_BASE_URL"])
print(f"agent: my model is at {os.environ['ANTHROPIC_BASE_URL']}; keys in my environment: "
      f"{[k for k in os.environ if 'KEY' in k] or 'none'}", flush=True)
conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
body = {"model": "stand-in", "max_tokens": 64, "stream": True,
        "messages": [{"role": "user", "content": sys.argv[1]}]}
conn.request("POST", "/v1/messages", body=json.dumps(body),
             headers={"content-type": "application/json", "anthropic-version": "2023-06-01"})
resp = conn.getresponse()
print(f"agent: model answered HTTP {resp.status}, streaming:", flush=True)
print("agent: ", end="", flush=True)
while True:
    line = resp.readline()
    if not line:
        break
    if line.startswith(b"data: "):
        data = json.loads(line[6:])
        if data["type"] == "content_block_delta":
            print(data["delta"]["text"], end="", flush=True)
print(flush=True)
sys.exit(0 if resp.status == 200 else 1)
