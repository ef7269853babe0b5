"""A real gRPC server (grpcio) for the gateway's tests: generic handlers, raw bytes, no
protoc. Every answer carries the server's name, so a test can tell who served a call.

    python server.py NAME [--tls CERT KEY]

Binds 127.0.0.1 on a free port and prints `ready PORT` once it serves.
Methods (service `test.Echo`):
  Name     unary: answers NAME
  Fail     unary: fails with NOT_FOUND and the message `no such thing: REQUEST`
  Stream   server streaming: REQUEST = "COUNT,MILLIS": COUNT messages `NAME:i`, MILLIS apart
  Bidi     bidirectional: answers each message M with `NAME:M` as soon as it arrives
  Collect  client streaming: answers `NAME:` + the messages joined with `+`
"""

import sys
import time
from concurrent import futures

import grpc

name = sys.argv[1]


def unary_name(request, context):
    return name.encode()


def unary_fail(request, context):
    context.abort(grpc.StatusCode.NOT_FOUND, "no such thing: " + request.decode())


def server_stream(request, context):
    count, millis = (int(x) for x in request.decode().split(","))
    for i in range(count):
        if i:
            time.sleep(millis / 1000)
        yield f"{name}:{i}".encode()


def bidi(requests, context):
    for message in requests:
        yield f"{name}:{message.decode()}".encode()


def collect(requests, context):
    return (name + ":" + "+".join(m.decode() for m in requests)).encode()


handlers = {
    "Name": grpc.unary_unary_rpc_method_handler(unary_name),
    "Fail": grpc.unary_unary_rpc_method_handler(unary_fail),
    "Stream": grpc.unary_stream_rpc_method_handler(server_stream),
    "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
    "Collect": grpc.stream_unary_rpc_method_handler(collect),
}

server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", handlers),))
if len(sys.argv) == 5 and sys.argv[2] == "--tls":
    with open(sys.argv[3], "rb") as c, open(sys.argv[4], "rb") as k:
        creds = grpc.ssl_server_credentials([(k.read(), c.read())])
    port = server.add_secure_port("127.0.0.1:0", creds)
else:
    port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(f"ready {port}", flush=True)
# Ends when the test kills it (by PID) or closes stdin.
try:
    sys.stdin.read()
finally:
    server.stop(0)
