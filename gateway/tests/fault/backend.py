"""A backend in a process of its own, so that a test can fault it the way a real server
fails: freeze it (SIGSTOP), kill it (SIGKILL), or switch it at run time:

    SIGUSR1   slow on/off: every GET but /healthz waits 2 s before its answer
    SIGUSR2   refusing on/off: close the listening socket and every open connection
              (connections are refused, as by a server that went away); the second
              SIGUSR2 listens again on the same port

GET /healthz answers "ok", any other GET the backend's name. Each switch prints a line
(`slow on`, `slow off`, `refusing`, `listening`) once it has taken effect.

    python3 backend.py NAME [PORT]    # prints the port it listens on (127.0.0.1), then serves
"""

import http.server
import signal
import socket
import sys
import threading
import time

NAME = sys.argv[1].encode()
PORT = int(sys.argv[2]) if len(sys.argv) > 2 else 0
SLOW_S = 2.0

slow = False
conns = set()
conns_lock = threading.Lock()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self):
        super().setup()
        with conns_lock:
            conns.add(self.connection)

    def finish(self):
        with conns_lock:
            conns.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def do_GET(self):
        health = self.path == "/healthz"
        if slow and not health:
            time.sleep(SLOW_S)
        body = b"ok" if health else NAME
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

    def handle_error(self, request, client_address):
        # A client (the gateway) that went away mid-answer: expected in these tests.
        pass


def serve(port):
    server = Server(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server


server = serve(PORT)
port = server.server_address[1]


def say(line):
    print(line, flush=True)


def toggle_slow(*_):
    global slow
    slow = not slow
    say("slow on" if slow else "slow off")


def toggle_refusing(*_):
    global server
    if server is not None:
        server.shutdown()
        server.server_close()
        server = None
        with conns_lock:
            for c in list(conns):
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        say("refusing")
    else:
        # SO_REUSEADDR (http.server sets it): the port is free again at once.
        server = serve(port)
        say("listening")


signal.signal(signal.SIGUSR1, toggle_slow)
signal.signal(signal.SIGUSR2, toggle_refusing)
say(port)
while True:
    signal.pause()
