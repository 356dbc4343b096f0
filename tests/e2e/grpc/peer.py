"""A real gRPC server and client (grpcio) for touchgate's end-to-end test.

    peer.py server             serves demo.Echo on 127.0.0.1, prints its port, runs until stdin closes
    peer.py server CERT KEY    the same over TLS (PEM files)
    peer.py client HOST:PORT   calls every method through HOST:PORT and prints one JSON object

Methods use raw bytes (no generated code): Unary echoes and reports who the gateway said the
caller is, ServerStream sends three messages, Bidi echoes each message, NotFound fails with
details and trailing metadata, Slow answers after two seconds (for a deadline).
"""

import json
import sys
import threading
import time
from concurrent import futures

import grpc


def unary(request, context):
    metadata = dict(context.invocation_metadata())
    context.set_trailing_metadata((("x-served-by", "peer.py"),))
    return json.dumps(
        {
            "echo": request.decode(),
            "user": metadata.get("x-touchgate-user"),
            "forged_assertion": metadata.get("x-touchgate-assertion") == "forged",
        }
    ).encode()


def server_stream(request, context):
    for i in range(3):
        yield f"{request.decode()}-{i}".encode()


def bidi(requests, context):
    for r in requests:
        yield b"echo:" + r


def not_found(request, context):
    context.set_trailing_metadata((("x-why", "gone"),))
    context.abort(grpc.StatusCode.NOT_FOUND, "no such item: " + request.decode())


def slow(request, context):
    time.sleep(2)
    return b"late"


def serve(tls=None):
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        "NotFound": grpc.unary_unary_rpc_method_handler(not_found),
        "Slow": grpc.unary_unary_rpc_method_handler(slow),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("demo.Echo", handlers),))
    if tls:
        # tls = (certificate PEM file, key PEM file): HTTPS with ALPN h2, as behind a company CA.
        with open(tls[0], "rb") as c, open(tls[1], "rb") as k:
            creds = grpc.ssl_server_credentials([(k.read(), c.read())])
        port = server.add_secure_port("127.0.0.1:0", creds)
    else:
        port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    sys.stdin.read()
    server.stop(0)


def client(target):
    out = {}
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary("/demo.Echo/Unary")
        reply, info = call.with_call(b"hello", metadata=(("x-touchgate-assertion", "forged"),), timeout=10)
        out["unary"] = json.loads(reply)
        out["unary_trailer"] = dict(info.trailing_metadata()).get("x-served-by")
        stream = channel.unary_stream("/demo.Echo/ServerStream")
        out["server_stream"] = [m.decode() for m in stream(b"n", timeout=10)]
        bidi_call = channel.stream_stream("/demo.Echo/Bidi")
        out["bidi"] = [m.decode() for m in bidi_call(iter([b"a", b"b", b"c"]), timeout=10)]
        try:
            channel.unary_unary("/demo.Echo/NotFound")(b"item-7", timeout=10)
            out["not_found"] = "no error"
        except grpc.RpcError as e:
            out["not_found"] = {
                "code": e.code().name,
                "details": e.details(),
                "why": dict(e.trailing_metadata() or ()).get("x-why"),
            }
        started = time.monotonic()
        try:
            channel.unary_unary("/demo.Echo/Slow")(b"", timeout=0.3)
            out["deadline"] = "no error"
        except grpc.RpcError as e:
            out["deadline"] = {"code": e.code().name, "seconds": round(time.monotonic() - started, 2)}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["server"]:
        serve()
    elif sys.argv[1:2] == ["server"] and len(sys.argv) == 4:
        serve(tls=(sys.argv[2], sys.argv[3]))
    elif sys.argv[1:2] == ["client"] and len(sys.argv) == 3:
        client(sys.argv[2])
    else:
        sys.exit(__doc__)
