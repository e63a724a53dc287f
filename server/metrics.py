"""Request metrics of one server process: a count per method and status code and a latency histogram per
method, readable two ways with nothing to install:

- ``--metrics-port P``: Prometheus text format (0.0.4) at ``http://HOST:P/metrics``, served by a tiny asyncio
  HTTP responder on the server's own event loop (with ``--workers N`` worker ``i`` listens on ``P + i``, so
  a scraper sees every process; SO_REUSEPORT would hand each scrape to a random worker);
- otherwise one summary line in the log every ``interval`` seconds when there was traffic.

Besides its own two series it renders counters that other parts of the process keep (``add_counters``: the
confirm batcher's batches and confirms), read when a scrape or a summary asks.

Why not ``prometheus_client``: it is not a dependency of the project, and the few series we keep do not need
it; its multi-process mode (a shared directory of mmap files) would be one more thing for operators to manage
with ``--workers``. The exposition format is small and stable, and the names follow its conventions
(``loyalty_grpc_requests_total``, ``loyalty_grpc_request_seconds`` histogram), so a switch later changes no
dashboard.

Everything here is called on the event loop's thread only, so there are no locks; the counters of other
parts are kept by their own threads under their own locks and only read here.
"""
from __future__ import annotations

import asyncio
import bisect
import logging
import time

__all__ = ["Metrics"]

log = logging.getLogger("loyalty.server.metrics")

# Upper bounds in seconds: sub-millisecond for CalculateReceipt, up to seconds for a confirm behind a lock.
BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _Histogram:
    __slots__ = ("counts", "total", "count")

    def __init__(self):
        self.counts = [0] * (len(BUCKETS) + 1)    # the last one is +Inf
        self.total = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds
        self.count += 1

    def quantile(self, q: float) -> float:
        """The upper bound of the bucket holding the q-th observation (an over-estimate, as Prometheus')."""
        if not self.count:
            return 0.0
        rank = q * self.count
        seen = 0
        for i, n in enumerate(self.counts):
            seen += n
            if seen >= rank:
                return BUCKETS[i] if i < len(BUCKETS) else float("inf")
        return float("inf")


class Metrics:
    def __init__(self):
        self.requests: dict[tuple[str, str], int] = {}     # (method, code) -> count
        self.latency: dict[str, _Histogram] = {}
        self.started = time.time()
        self._last_summary: dict[tuple[str, str], int] = {}
        self._counter_sources: list = []
        self._last_counters: dict[str, int] = {}

    def add_counters(self, source) -> None:
        """``source()`` -> ``{name: (help, value)}``: counters that another part of the process keeps (the
        confirm batcher's), read when rendering and summarising."""
        self._counter_sources.append(source)

    def _counters(self) -> dict[str, tuple[str, int]]:
        out: dict[str, tuple[str, int]] = {}
        for source in self._counter_sources:
            out.update(source())
        return out

    def observe(self, method: str, code: str, seconds: float) -> None:
        key = (method, code)
        self.requests[key] = self.requests.get(key, 0) + 1
        hist = self.latency.get(method)
        if hist is None:
            hist = self.latency[method] = _Histogram()
        hist.observe(seconds)

    # ---- Prometheus text ------------------------------------------------------------------------------------

    def render(self) -> str:
        out = [
            "# HELP loyalty_grpc_requests_total gRPC requests handled, by method and status code.",
            "# TYPE loyalty_grpc_requests_total counter",
        ]
        for (method, code), n in sorted(self.requests.items()):
            out.append(f'loyalty_grpc_requests_total{{method="{method}",code="{code}"}} {n}')
        out += [
            "# HELP loyalty_grpc_request_seconds Time from request decoded to answer ready, by method.",
            "# TYPE loyalty_grpc_request_seconds histogram",
        ]
        for method, hist in sorted(self.latency.items()):
            cumulative = 0
            for bound, n in zip(BUCKETS + (float("inf"),), hist.counts):
                cumulative += n
                le = "+Inf" if bound == float("inf") else repr(bound)
                out.append(f'loyalty_grpc_request_seconds_bucket{{method="{method}",le="{le}"}} {cumulative}')
            out.append(f'loyalty_grpc_request_seconds_sum{{method="{method}"}} {hist.total:.6f}')
            out.append(f'loyalty_grpc_request_seconds_count{{method="{method}"}} {hist.count}')
        for name, (text, value) in sorted(self._counters().items()):
            out += [f"# HELP {name} {text}", f"# TYPE {name} counter", f"{name} {value}"]
        out += [
            "# HELP loyalty_process_start_time_seconds Start time of the process since the Unix epoch.",
            "# TYPE loyalty_process_start_time_seconds gauge",
            f"loyalty_process_start_time_seconds {self.started:.3f}",
        ]
        return "\n".join(out) + "\n"

    async def serve_http(self, host: str, port: int) -> asyncio.AbstractServer:
        """Answer ``GET /metrics`` (any path, in fact) with :meth:`render`; one request per connection."""

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                request_line = await asyncio.wait_for(reader.readline(), 5)
                while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                    pass
                if request_line.startswith(b"GET "):
                    body = self.render().encode()
                    head = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
                            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body))
                else:
                    body, head = b"", b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n"
                writer.write(head + body)
                await writer.drain()
            except (asyncio.TimeoutError, ConnectionError):
                pass
            finally:
                writer.close()

        return await asyncio.start_server(handle, host, port)

    # ---- log summary ----------------------------------------------------------------------------------------

    def summary(self) -> str | None:
        """One line with what changed since the last summary (None when nothing did)."""
        delta: dict[str, dict[str, int]] = {}
        for key, n in self.requests.items():
            d = n - self._last_summary.get(key, 0)
            if d:
                delta.setdefault(key[0], {})[key[1]] = d
        self._last_summary = dict(self.requests)
        if not delta:
            return None
        counters = {name: value for name, (_text, value) in self._counters().items()}
        moved = {name: value - self._last_counters.get(name, 0) for name, value in counters.items()}
        self._last_counters = counters
        parts = []
        for method, codes in sorted(delta.items()):
            hist = self.latency[method]
            counts = " ".join(f"{code}={n}" for code, n in sorted(codes.items()))
            parts.append(f"{method}: {counts} p50<={hist.quantile(0.5) * 1000:g}ms "
                         f"p99<={hist.quantile(0.99) * 1000:g}ms")
        batches, batched = moved.get("loyalty_confirm_batches_total"), moved.get("loyalty_confirm_batched_total")
        if batches:
            parts.append(f"confirm batches: {batches} of {batched / batches:.1f} on average")
        return "requests since last summary: " + "; ".join(parts)

    async def log_periodically(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            line = self.summary()
            if line:
                log.info(line)
