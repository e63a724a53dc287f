"""The benchmark's baseline: a bare grpc.aio server that answers ``loyalty.v1.Processing/CalculateReceipt``
with a pre-built response of the same size as the real server's, doing no work at all (the request is not even
decoded). Whatever the real server costs beyond this is ours: decoding, the engine, the thread hop, encoding.

    python -m loyalty.server.echo --port 50061 [--response FILE]

``--response`` is a serialized ``CalculateReceiptResponse`` (the benchmark saves the real server's answer to
the fixed request, so both send the same bytes); without it, a 20-line answer is built here. It prints
``listening on HOST:PORT`` once ready and stops on SIGTERM / SIGINT.
"""
from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import grpc

from loyalty.v1 import receipt_pb2, processing_pb2

__all__ = ["build_response", "run"]


def build_response(lines: int = 20) -> bytes:
    """A plausible answer to a ``lines``-line receipt: one discount and some points per line."""
    answer = receipt_pb2.ReceiptAnswer(program_version=1, promotions=["demo-10"])
    for i in range(lines):
        amount = 10_000 + 137 * i
        answer.lines.add(sku=f"sku-{i:05d}", amount=amount, payable=amount - amount // 10, points=amount // 300,
                         discounts=[receipt_pb2.Discount(promotion="demo-10", amount=amount // 10)])
    total = sum(line.amount for line in answer.lines)
    answer.totals.CopyFrom(receipt_pb2.Totals(amount=total, discount=total // 10, payable=total - total // 10,
                                              accrued_points=sum(line.points for line in answer.lines)))
    answer.member.CopyFrom(receipt_pb2.MemberState(card="7000001", status="active", tier="Basic"))
    return processing_pb2.CalculateReceiptResponse(answer=answer).SerializeToString()


async def run(host: str, port: int, response: bytes) -> None:
    async def calculate(_raw: bytes, _context) -> bytes:
        return response

    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "loyalty.v1.Processing", {"CalculateReceipt": grpc.unary_unary_rpc_method_handler(calculate)}),))
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(f"listening on {host}:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loyalty.server.echo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50061)
    parser.add_argument("--response", help="a serialized CalculateReceiptResponse to answer with")
    args = parser.parse_args(argv)
    if args.response:
        with open(args.response, "rb") as f:
            response = f.read()
        processing_pb2.CalculateReceiptResponse.FromString(response)   # refuse a file that is not one
    else:
        response = build_response()
    asyncio.run(run(args.host, args.port, response))
    return 0


if __name__ == "__main__":
    sys.exit(main())
