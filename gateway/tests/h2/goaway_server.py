"""An h2c server that ends each connection the way nginx (`http2_max_requests`) and Go's
server do: after N requests, a single GOAWAY whose last stream id is the last request it
answered, then it stops reading requests and closes the connection. Streams the client
opened after that stream are not processed (RFC 9113 section 6.8: the client may send
them again). Every request gets `200 py`.

Prints `ready PORT`; when stdin closes, prints a JSON report and exits: {"accepted":
connections, "goaways": GOAWAYs sent, "answered": requests answered}.

usage: goaway_server.py N
"""
import json
import socket
import sys
import threading

import h2.config
import h2.connection
import h2.events


def main():
    n = int(sys.argv[1])
    stats = {"accepted": 0, "goaways": 0, "answered": 0}
    lock = threading.Lock()
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(128)

    def accept():
        while True:
            sock, _ = srv.accept()
            with lock:
                stats["accepted"] += 1
            threading.Thread(target=serve, args=(sock, n, stats, lock), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    print("ready", srv.getsockname()[1], flush=True)
    sys.stdin.read()
    with lock:
        print(json.dumps(stats), flush=True)


def serve(sock, n, stats, lock):
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    answered, closing = 0, False
    try:
        while not closing:
            data = sock.recv(65536)
            if not data:
                return
            for event in conn.receive_data(data):
                if not isinstance(event, h2.events.RequestReceived) or closing:
                    continue
                conn.send_headers(event.stream_id, [(":status", "200"), ("content-length", "2")])
                conn.send_data(event.stream_id, b"py", end_stream=True)
                answered += 1
                if answered == n:
                    conn.close_connection(last_stream_id=event.stream_id)
                    closing = True
            sock.sendall(conn.data_to_send())
        # Half-close, then drain what the client still sends until it closes too: closing
        # with unread data would reset the connection and lose the answers and the GOAWAY.
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(5)
        while sock.recv(65536):
            pass
    except OSError:
        pass
    finally:
        sock.close()
        with lock:
            stats["answered"] += answered
            stats["goaways"] += 1 if closing else 0


if __name__ == "__main__":
    main()
