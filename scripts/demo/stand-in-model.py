#!/usr/bin/env python3
"""A stand-in model endpoint for the demo: an Anthropic-style
`POST /v1/messages` that streams its answer as server-sent events.

It answers only requests carrying the expected key (`x-api-key`, from the
environment variable DEMO_MODEL_KEY), so the demo shows the key being added
outside the jail. Prints the port it listens on (127.0.0.1, ephemeral) as
its first line of stdout.
"""
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

KEY = os.environ["DEMO_MODEL_KEY"]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        sys.stderr.write("[model] " + (fmt % args) + "\n")

    def send_json(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        if self.headers.get("x-api-key") != KEY:
            return self.send_json(401, {"type": "error", "error": {"type": "authentication_error"}})
        if self.path != "/v1/messages":
            return self.send_json(404, {"type": "error", "error": {"type": "not_found_error"}})
        request = json.loads(body)
        question = request["messages"][-1]["content"]
        words = f"You asked: {question!r}. The key was added outside the jail.".split(" ")
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()

        def event(name, data):
            chunk = f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.flush()

        event("message_start", {"type": "message_start"})
        for w in words:
            event("content_block_delta", {"type": "content_block_delta", "delta": {"type": "text_delta", "text": w + " "}})
            time.sleep(0.05)
        event("message_stop", {"type": "message_stop"})
        self.wfile.write(b"0\r\n\r\n")


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
