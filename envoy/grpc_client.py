"""A gRPC client for the demo and tests/grpc.rs: grpcio from PyPI (`make grpcio` installs it into
.venv), no generated code, messages as raw bytes. Prints what a gRPC client sees of a call: its
status, its initial and trailing metadata, and the messages.

    .venv/bin/python envoy/grpc_client.py HOST:PORT /demo.Echo/Say [--stream] [--json] \
        [-H 'name: value']... [-d TEXT]

`--stream` calls a server-streaming method; `--json` prints one JSON object instead of lines.
"""

import argparse
import json
import sys

import grpc


def call(target, method, stream, metadata, data):
    with grpc.insecure_channel(target) as channel:
        if stream:
            responses = channel.unary_stream(method)(data, metadata=metadata, timeout=10)
            messages = []
            try:
                for message in responses:
                    messages.append(message)
            except grpc.RpcError:
                pass
            outcome = responses
        else:
            try:
                message, outcome = channel.unary_unary(method).with_call(data, metadata=metadata, timeout=10)
                messages = [message]
            except grpc.RpcError as failed:
                outcome, messages = failed, []
        return {
            "code": outcome.code().value[0],
            "status": outcome.code().name,
            "details": outcome.details() or "",
            "initial": [[m.key, m.value] for m in outcome.initial_metadata() or ()],
            "trailing": [[m.key, m.value] for m in outcome.trailing_metadata() or ()],
            "messages": [m.decode(errors="replace") for m in messages],
        }


def main(argv):
    parser = argparse.ArgumentParser(description="a gRPC call with raw-bytes messages")
    parser.add_argument("target")
    parser.add_argument("method")
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("-H", dest="headers", action="append", default=[])
    parser.add_argument("-d", dest="data", default="world")
    args = parser.parse_args(argv[1:])
    metadata = [tuple(p.strip() for p in h.split(":", 1)) for h in args.headers]
    result = call(args.target, args.method, args.stream, metadata, args.data.encode())
    if args.json:
        print(json.dumps(result))
        return
    print(f"grpc-status: {result['code']} {result['status']}")
    if result["details"]:
        print(f"grpc-message: {result['details']}")
    for key, value in result["initial"] + result["trailing"]:
        print(f"{key}: {value}")
    for message in result["messages"]:
        print(f"message: {message}")


if __name__ == "__main__":
    main(sys.argv)
