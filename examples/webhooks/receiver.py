"""A receiver of redirect-session webhooks, shown in docs/WEBHOOKS.md ("Receiving webhooks:
verified examples").

The standard library's http.server, plus two PyPI packages (requirements.txt beside this file):
standardwebhooks checks the signature, cloudevents parses the event.

    WEBHOOK_SECRET=whsec_... WEBHOOK_API_KEY=... PORT=8080 python3 receiver.py

It answers 204 to a verified delivery (to a repeat too: it was handled already), 401 when the
x-api-key or the signature is wrong, 400 when the signed body is no CloudEvent, and prints one
JSON line per request: {"verified": ..., "id": ..., "type": ..., "data": ...}.
"""

import hmac
import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cloudevents.core.bindings.http import HTTPMessage, from_http_event
from standardwebhooks import Webhook, WebhookVerificationError

WEBHOOK = Webhook(os.environ["WEBHOOK_SECRET"])  # the subscription's signingSecret, whsec_...
API_KEY = os.environ["WEBHOOK_API_KEY"].encode()  # the subscription's apiKey
HOST = os.environ.get("HOST", "127.0.0.1")
PORT = int(os.environ.get("PORT", "8080"))
MAX_BODY = 1 << 20

# The ids of the events handled so far. Delivery is at least once: a repeat is answered 204 and
# not handled again. A real receiver keeps them in its database (a unique key), not in memory.
seen = set()
seen_lock = threading.Lock()


class Receiver(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        length = int(self.headers.get("content-length") or 0)
        if length > MAX_BODY:
            self.close_connection = True
            return self.answer(413, verified=False, error="body too large")
        body = self.rfile.read(length)  # the raw bytes: the signature is over them
        headers = {name.lower(): value for name, value in self.headers.items()}
        try:
            if not hmac.compare_digest(headers.get("x-api-key", "").encode(), API_KEY):
                raise WebhookVerificationError("wrong x-api-key")
            # Checks webhook-timestamp (five minutes either way) and accepts the body if any
            # of the space-separated v1 signatures matches (two while a secret is rotated).
            WEBHOOK.verify(body, headers, json_parse=False)
        except (WebhookVerificationError, ValueError) as error:
            return self.answer(401, verified=False, id=headers.get("webhook-id"), error=str(error))
        try:
            # A structured CloudEvent: the whole event is the JSON body.
            event = from_http_event(HTTPMessage(headers, body))
        except Exception as error:  # malformed JSON or a missing attribute: the SDK's errors vary
            return self.answer(400, verified=True, id=headers.get("webhook-id"), error=str(error))
        with seen_lock:
            duplicate = event.get_id() in seen
            seen.add(event.get_id())
        # Queue the real work here (read data["state"], or GET the session) and answer at once.
        self.answer(
            204,
            verified=True,
            id=event.get_id(),
            type=event.get_type(),
            data=event.get_data(),
            duplicate=duplicate,
        )

    def answer(self, status, **line):
        print(json.dumps(line), flush=True)
        self.send_response(status)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format, *args):
        pass  # stdout has one JSON line per request instead


if __name__ == "__main__":
    server = ThreadingHTTPServer((HOST, PORT), Receiver)
    print(f"listening on http://{HOST}:{server.server_port}", file=sys.stderr, flush=True)
    server.serve_forever()
