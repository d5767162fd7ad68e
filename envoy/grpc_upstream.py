"""A gRPC upstream for the demo and tests/grpc.rs: a real gRPC server (grpcio from PyPI, which
`make grpcio` installs into .venv) serving `demo.Echo` without generated code, messages as raw
bytes.

    .venv/bin/python envoy/grpc_upstream.py [ADDRESS:]PORT [RECORD]

- `/demo.Echo/Say` (unary) answers `hello, ` + the request.
- `/demo.Echo/Count` (server streaming) answers three messages, `1: ` + the request, and so on.

Request metadata steers a call, as the HTTP test upstream's `x-upstream-*` headers do:
`x-upstream-header: name: value` adds initial metadata, `x-upstream-trailer: name: value` trailing
metadata, and `x-upstream-status: CODE` fails the call with that status after its headers went
out, so the status comes in the trailers. Each call is appended to RECORD as a JSON line (method
and request metadata), for a test to see what reached the upstream. Prints `listening on PORT`
once it serves (PORT 0: one the kernel picks). ADDRESS defaults to 127.0.0.1.
"""

import json
import sys
import threading
from concurrent import futures

import grpc


class Echo:
    def __init__(self, record):
        self.record = record
        self.lock = threading.Lock()

    def steer(self, method, context):
        """Records the call, sends the metadata asked for; the status to fail with, if any."""
        metadata = [(m.key, m.value) for m in context.invocation_metadata()]
        if self.record:
            line = json.dumps({"method": method, "metadata": metadata})
            with self.lock, open(self.record, "a") as f:
                f.write(line + "\n")
        initial, trailing, status = [], [], None
        for key, value in metadata:
            if key == "x-upstream-header":
                initial.append(tuple(p.strip() for p in value.split(":", 1)))
            elif key == "x-upstream-trailer":
                trailing.append(tuple(p.strip() for p in value.split(":", 1)))
            elif key == "x-upstream-status":
                status = int(value)
        context.send_initial_metadata(initial)
        context.set_trailing_metadata(trailing)
        return status

    def fail(self, context, status):
        code = next(c for c in grpc.StatusCode if c.value[0] == status)
        context.abort(code, "failed as the request asked")

    def say(self, request, context):
        status = self.steer("/demo.Echo/Say", context)
        if status:
            self.fail(context, status)
        return b"hello, " + request

    def count(self, request, context):
        status = self.steer("/demo.Echo/Count", context)
        for n in (1, 2, 3):
            yield b"%d: " % n + request
        if status:
            self.fail(context, status)


def main(argv):
    address, _, port = (argv[1] if len(argv) > 1 else "8001").rpartition(":")
    echo = Echo(argv[2] if len(argv) > 2 else None)
    handler = grpc.method_handlers_generic_handler(
        "demo.Echo",
        {
            "Say": grpc.unary_unary_rpc_method_handler(echo.say),
            "Count": grpc.unary_stream_rpc_method_handler(echo.count),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((handler,))
    bound = server.add_insecure_port(f"{address or '127.0.0.1'}:{port}")
    server.start()
    print(f"listening on {bound}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main(sys.argv)
