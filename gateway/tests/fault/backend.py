"""A backend in a process of its own, so that a test can freeze it (SIGSTOP) like a
stalled server: GET /healthz answers "ok", any other GET the backend's name.

    python3 backend.py NAME    # prints the port it listens on (127.0.0.1), then serves
"""

import http.server
import sys

NAME = sys.argv[1].encode()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = b"ok" if self.path == "/healthz" else NAME
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.send_header("x-backend", NAME.decode())
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256


server = Server(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
