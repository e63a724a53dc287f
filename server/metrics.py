"""Metrics of the server, kept by ``prometheus_client``: what a call did, and what the process is.

Series (the names dashboards use):

- ``loyalty_grpc_requests_total{method,code}`` (counter), ``loyalty_grpc_request_seconds{method}`` (histogram,
  from request decoded to answer ready), ``loyalty_grpc_requests_in_flight`` (gauge);
- ``loyalty_confirm_batches_total`` / ``loyalty_confirm_batched_total`` (counters: group-commit batches and the
  confirms in them) and ``loyalty_confirm_batch_size`` (histogram of the batch sizes);
- the library's process and runtime series (``process_*``, ``python_gc_*``, ``python_info``).

How they are read:

- one process (``--metrics-port P``): ``GET http://HOST:P/metrics`` answered by a small responder on the server's
  own event loop (no thread: a scrape never competes with a call for the GIL from another thread);
- ``--workers N --metrics-port P``: prometheus_client's multi-process mode. The parent process owns the
  directory (``$PROMETHEUS_MULTIPROC_DIR`` if set, else a new temporary one; emptied at start, since files of
  an earlier run would be summed in, and a temporary one removed at exit) and serves port P alone, summing
  every worker's files (:func:`serve_multiprocess`); workers only write. Custom collectors do not cross
  processes, so each worker copies its process and runtime series into per-pid gauges every few seconds
  (:meth:`Metrics.mirror_process_periodically`), and the parent forgets a dead worker's live gauges;
- without ``--metrics-port``: one summary line in the log every ``interval`` seconds when there was traffic.

The cost on the hot path: a counter increment, a histogram observation and the in-flight gauge's increment and
decrement, about 4 us a call in one process and 7 us with the multi-process mode's mmap files (timeit on the
shared 2-core machine; the labelled children are looked up once per (method, code), not per call). Measured
against the hand-written exporter this replaced, in interleaved runs on that machine: the server's CPU per
CalculateReceipt 0.97x (medians of 4 runs each, with run-to-run noise of +-15%), benchmarks/server.py's
calculate/echo ratio 0.585 against 0.627 (medians of 10 rounds each, single rounds from 0.14 to 1.08): no
difference the machine can resolve. Everything that observes a call runs on the event loop's thread.
"""
from __future__ import annotations

import asyncio
import logging
import os
import pathlib
import shutil
import tempfile

import prometheus_client
from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, GCCollector, PlatformCollector,
                               ProcessCollector, generate_latest, multiprocess)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.utils import floatToGoString

__all__ = ["Metrics", "BUCKETS", "MULTIPROC_ENV", "prepare_multiprocess_dir", "serve_multiprocess"]

log = logging.getLogger("loyalty.server.metrics")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Upper bounds in seconds: sub-millisecond for CalculateReceipt, up to seconds for a confirm behind a lock.
BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Group-commit batch sizes: the batcher takes at most $LOYALTY_CONFIRM_BATCH (32 by default).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# What ``generate_latest`` writes (the classic text format; CONTENT_TYPE_LATEST may name a newer one).
CONTENT_TYPE = prometheus_client.exposition.CONTENT_TYPE_PLAIN_0_0_4.encode()

# ``*_created`` series (a timestamp per labelled child) double the exposition and the work of a new child, and
# no dashboard of ours reads them.
prometheus_client.disable_created_metrics()


class _Counters:
    """A collector of counters another part of the process keeps itself (``Metrics.add_counters``)."""

    def __init__(self):
        self.sources: list = []

    def collect(self):
        for source in self.sources:
            for name, (text, value) in source().items():
                yield CounterMetricFamily(name.removesuffix("_total"), text, value=value)


class Metrics:
    """The series of one process, in a registry of its own (so that tests can make several)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        if MULTIPROC_ENV not in os.environ:     # (in multi-process mode they cannot reach the parent: mirrored)
            for collector in (ProcessCollector, PlatformCollector, GCCollector):
                collector(registry=self.registry)
        self._other = _Counters()
        self.registry.register(self._other)
        self.requests = Counter("loyalty_grpc_requests", "gRPC requests handled, by method and status code.",
                                ("method", "code"), registry=self.registry)
        self.latency = Histogram("loyalty_grpc_request_seconds",
                                 "Time from request decoded to answer ready, by method.", ("method",),
                                 buckets=BUCKETS, registry=self.registry)
        self.in_flight = Gauge("loyalty_grpc_requests_in_flight", "gRPC calls being handled now.",
                               registry=self.registry, multiprocess_mode="livesum")
        self._children: dict[tuple[str, str], tuple] = {}
        self._last_summary: dict[tuple[str, tuple], float] = {}
        self._mirrored: dict[str, Gauge] = {}
        self._own: CollectorRegistry | None = None      # this process's own series, to mirror

    # ---- recording ------------------------------------------------------------------------------------------

    def observe(self, method: str, code: str, seconds: float) -> None:
        """One call of ``method`` ended with ``code`` after ``seconds``."""
        children = self._children.get((method, code))
        if children is None:
            children = self._children[method, code] = (self.requests.labels(method, code),
                                                       self.latency.labels(method))
        children[0].inc()
        children[1].observe(seconds)

    def group_commit_observer(self):
        """The group-commit series (made now, so that they show from the start) and the function that records
        one batch of ``n`` confirms in them (the batcher's ``on_batch``, called from its threads)."""
        batches = Counter("loyalty_confirm_batches", "ConfirmPurchase group-commit batches run.",
                          registry=self.registry)
        batched = Counter("loyalty_confirm_batched", "Confirms run in group-commit batches.", registry=self.registry)
        size = Histogram("loyalty_confirm_batch_size", "Confirms per group-commit batch.", buckets=BATCH_BUCKETS,
                         registry=self.registry)

        def on_batch(n: int) -> None:
            batches.inc()
            batched.inc(n)
            size.observe(n)
        return on_batch

    def add_counters(self, source) -> None:
        """``source()`` -> ``{name: (help, value)}``: counters that another part of the process keeps, read when
        rendering and summarising (this process's registry only: they do not cross to a multi-process parent)."""
        self._other.sources.append(source)

    # ---- Prometheus text ------------------------------------------------------------------------------------

    def render(self) -> str:
        return generate_latest(self.registry).decode()

    async def serve_http(self, host: str, port: int) -> asyncio.AbstractServer:
        """Answer ``GET /metrics`` (any path, in fact) with :meth:`render`; one request per connection."""

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                request_line = await asyncio.wait_for(reader.readline(), 5)
                while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                    pass
                if request_line.startswith(b"GET "):
                    body = generate_latest(self.registry)
                    head = (b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                            % (CONTENT_TYPE, len(body)))
                else:
                    body, head = b"", b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n"
                writer.write(head + body)
                await writer.drain()
            except (asyncio.TimeoutError, ConnectionError):
                pass
            finally:
                writer.close()

        return await asyncio.start_server(handle, host, port)

    # ---- a worker's process series, for the multi-process parent -------------------------------------------

    def mirror_process(self) -> None:
        """Copy this process's process and runtime series into gauges the parent sums per pid ("liveall": a
        dead worker's go with it). Their type there is gauge, whatever the library's collector says."""
        if self._own is None:
            self._own = CollectorRegistry()
            for collector in (ProcessCollector, PlatformCollector, GCCollector):
                collector(registry=self._own)
        for family in self._own.collect():
            for sample in family.samples:
                gauge = self._mirrored.get(sample.name)
                if gauge is None:
                    gauge = self._mirrored[sample.name] = Gauge(
                        sample.name, family.documentation, sorted(sample.labels), registry=None,
                        multiprocess_mode="liveall")
                (gauge.labels(**sample.labels) if sample.labels else gauge).set(sample.value)

    async def mirror_process_periodically(self, interval: float = 5.0) -> None:
        while True:
            self.mirror_process()
            await asyncio.sleep(interval)

    # ---- log summary ----------------------------------------------------------------------------------------

    def _samples(self) -> dict[tuple[str, tuple], float]:
        """``(sample name, sorted label items)`` -> value, of every series of this process's registry."""
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in self.registry.collect() for s in family.samples}

    def summary(self) -> str | None:
        """One line with what changed since the last summary (None when no call did)."""
        now = self._samples()
        moved = {key: value - self._last_summary.get(key, 0) for key, value in now.items()}
        self._last_summary = now
        codes: dict[str, dict[str, int]] = {}
        for (name, labels), n in moved.items():
            if name == "loyalty_grpc_requests_total" and n:
                label = dict(labels)
                codes.setdefault(label["method"], {})[label["code"]] = int(n)
        if not codes:
            return None
        parts = [f"{method}: {' '.join(f'{c}={n}' for c, n in sorted(by_code.items()))} "
                 f"p50<={_quantile(moved, method, 0.5) * 1000:g}ms p99<={_quantile(moved, method, 0.99) * 1000:g}ms"
                 for method, by_code in sorted(codes.items())]
        batches = moved.get(("loyalty_confirm_batches_total", ()))
        if batches:
            batched = moved.get(("loyalty_confirm_batched_total", ()), 0)
            parts.append(f"confirm batches: {int(batches)} of {batched / batches:.1f} on average")
        return "requests since last summary: " + "; ".join(parts)

    async def log_periodically(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            line = self.summary()
            if line:
                log.info(line)


def _quantile(moved: dict[tuple[str, tuple], float], method: str, q: float) -> float:
    """The upper bound of the latency bucket holding the q-th of ``method``'s calls in ``moved`` (an
    over-estimate, as Prometheus' ``histogram_quantile``)."""
    count = moved.get(("loyalty_grpc_request_seconds_count", (("method", method),)), 0)
    for bound in BUCKETS:
        le = (("le", floatToGoString(bound)), ("method", method))
        if count and moved.get(("loyalty_grpc_request_seconds_bucket", le), 0) >= q * count:
            return bound
    return float("inf") if count else 0.0


# ---- the multi-process parent ---------------------------------------------------------------------------------

def prepare_multiprocess_dir() -> tuple[pathlib.Path, bool]:
    """The directory the workers' metric files go to, set in ``$PROMETHEUS_MULTIPROC_DIR`` for the workers to
    inherit and emptied; ``(path, made)``: ``made`` when it is a temporary one of ours (remove it at exit)."""
    given = os.environ.get(MULTIPROC_ENV)
    path = pathlib.Path(given) if given else pathlib.Path(tempfile.mkdtemp(prefix="loyalty-metrics-"))
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink()
    os.environ[MULTIPROC_ENV] = str(path)
    return path, not given


def serve_multiprocess(host: str, port: int, path: pathlib.Path):
    """Serve ``http://HOST:PORT/metrics``: every worker's series summed from ``path`` (prometheus_client's HTTP
    server, in a daemon thread of the parent). Returns the server (``shutdown()`` it)."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(path))
    server, _thread = prometheus_client.start_http_server(port, addr=host, registry=registry)
    return server


def forget_process(pid: int, path: pathlib.Path) -> None:
    """A worker exited: its live gauges (in flight, process series) no longer count."""
    multiprocess.mark_process_dead(pid, str(path))


def remove_multiprocess_dir(path: pathlib.Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
