"""A stand-in for an OpenAI-compatible chat endpoint's replies, shared by the annotator tests."""

import http.server
import json

# The reply body of `POST /v1/chat/completions` as the OpenAI API reference gives it ("The chat completion object":
# `choices[].message.content`), cut to the fields the annotator reads.
ANSWER = {"choices": [{"message": {"content": " A calm scene. "}}]}


class QuietHandler(http.server.BaseHTTPRequestHandler):
    """A request handler that logs nothing and answers JSON with `reply`."""

    def reply(self, status, payload, headers=None):
        body = json.dumps(payload).encode()
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass
