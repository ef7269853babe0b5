"""A real gRPC client (grpcio) for the gateway's tests: one channel to TARGET, then one
scenario; prints one JSON object with what happened.

    python client.py TARGET SCENARIO [ARGS...]

Scenarios:
  unary COUNT [KILL_AT PID]  COUNT unary calls on one channel; with KILL_AT, the process
                             PID is killed (SIGKILL) before call number KILL_AT
  stream COUNT MILLIS        one server-streaming call: arrival time of each message
  bidi COUNT                 one bidirectional call, ping-pong: the next message is sent
                             only after the answer to the previous one arrived
  collect COUNT              one client-streaming call
  fail                       one call that the server fails with NOT_FOUND
  unavailable                one call; its status, message and duration
  parallel N COUNT MILLIS    N server-streaming calls at once (threads, one channel)
Every call has a 10 s deadline, so a hang shows up as DEADLINE_EXCEEDED, not as a stuck test.
"""

import collections
import json
import os
import queue
import signal
import sys
import time

import grpc

DEADLINE = 10
target, scenario, args = sys.argv[1], sys.argv[2], sys.argv[3:]
channel = grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)])


def method(kind, name):
    return getattr(channel, kind)(f"/test.Echo/{name}")


def status(e):
    return {"code": e.code().name, "message": e.details()}


out = {}
if scenario == "unary":
    count = int(args[0])
    kill_at, pid = (int(args[1]), int(args[2])) if len(args) == 3 else (None, None)
    call = method("unary_unary", "Name")
    served = collections.Counter()
    errors = []
    for i in range(count):
        if i == kill_at:
            os.kill(pid, signal.SIGKILL)
            time.sleep(0.3)
        try:
            served[call(b"hi", timeout=DEADLINE).decode()] += 1
        except grpc.RpcError as e:
            errors.append(status(e))
    out = {"served": served, "errors": errors}
elif scenario == "stream":
    started = time.monotonic()
    messages, times = [], []
    call = method("unary_stream", "Stream")
    for m in call(f"{args[0]},{args[1]}".encode(), timeout=DEADLINE):
        times.append(time.monotonic() - started)
        messages.append(m.decode())
    out = {"messages": messages, "times": times}
elif scenario == "bidi":
    count = int(args[0])
    answered = queue.Queue()
    sent_at = []

    def requests():
        for i in range(count):
            if i:
                # The next message waits for the previous answer: a gateway that held
                # the request stream (or the answers) back would stall here.
                answered.get(timeout=DEADLINE)
            sent_at.append(time.monotonic())
            yield f"m{i}".encode()

    started = time.monotonic()
    messages, times = [], []
    for m in method("stream_stream", "Bidi")(requests(), timeout=DEADLINE):
        times.append(time.monotonic() - started)
        messages.append(m.decode())
        answered.put(True)
    out = {"messages": messages, "times": times, "last_sent": sent_at[-1] - started}
elif scenario == "collect":
    reply = method("stream_unary", "Collect")(iter([f"m{i}".encode() for i in range(int(args[0]))]), timeout=DEADLINE)
    out = {"reply": reply.decode()}
elif scenario == "fail":
    try:
        method("unary_unary", "Fail")(b"thing-42", timeout=DEADLINE)
        out = {"code": "OK"}
    except grpc.RpcError as e:
        out = status(e)
elif scenario == "unavailable":
    started = time.monotonic()
    try:
        method("unary_unary", "Name")(b"hi", timeout=DEADLINE)
        out = {"code": "OK"}
    except grpc.RpcError as e:
        out = status(e)
    out["seconds"] = time.monotonic() - started
elif scenario == "parallel":
    import threading

    n, count, millis = (int(a) for a in args)
    results = [None] * n

    def one(i):
        call = method("unary_stream", "Stream")
        try:
            results[i] = len(list(call(f"{count},{millis}".encode(), timeout=DEADLINE)))
        except grpc.RpcError as e:
            results[i] = status(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out = {"results": results}
else:
    sys.exit(f"unknown scenario {scenario}")
print(json.dumps(out), flush=True)
