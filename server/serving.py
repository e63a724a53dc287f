"""Running the gRPC edge: a configuration checked before anything is written, one server process (signals,
graceful shutdown) or several workers sharing a port under a parent that forwards signals, serves their metrics
and waits."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import multiprocessing
import os
import signal
import socket
import sys

from loyalty.server.errors import InvalidArgument, ServiceError
from loyalty.server.grpc_server import LoyaltyServer, ServeConfig, host_port
from loyalty.server.logs import configure_logging

__all__ = ["serve", "run_server", "check_serving"]

log = logging.getLogger("loyalty.server.grpc")

def _open_service(config: ServeConfig):
    from loyalty.server.processing import ProcessingService
    # One group-commit batch in flight per process when several processes serve (each one per core): their
    # batches already overlap each other; two per process then only made each batch smaller (in interleaved
    # runs of benchmarks/server.py on 2 cores, 2 workers x 1 did ~15% more confirms than 2 x 2). One process
    # alone keeps two, so that one batch is calculated while the other waits for its COMMIT.
    threads = None
    if config.workers > 1 and not os.environ.get("LOYALTY_CONFIRM_BATCH_THREADS"):
        threads = 1
    return ProcessingService.open(config.database_url, redis_url=config.redis_url, batch_threads=threads)


def check_serving(config: ServeConfig) -> None:
    """Refuse a configuration that must not serve (``InvalidArgument`` saying why): a non-loopback address
    without authentication and TLS (unless ``insecure``), certificate files that do not load."""
    from loyalty.server.security.edge import exposure_problem
    problem = exposure_problem(config.host, auth_required=config.auth == "required", tls=config.tls is not None,
                               insecure=config.insecure)
    if problem:
        raise InvalidArgument("--host", problem)
    if config.tls is not None:
        from loyalty.server.security import tls
        tls.check(config.tls)


async def run_server(config: ServeConfig, *, service=None, announce=None, worker: int = 0) -> None:
    """Serve until SIGTERM / SIGINT, then shut down gracefully. ``announce(line)`` is called once listening."""
    check_serving(config)
    loop = asyncio.get_running_loop()
    own_service = service is None
    if own_service:
        service = await loop.run_in_executor(None, _open_service, config)
    server = LoyaltyServer(service, config)
    stop = asyncio.Event()

    def on_signal(signum):
        if stop.is_set():
            log.info("already shutting down (signal %s ignored)", signal.Signals(signum).name)
            return
        log.info("%s: shutting down, finishing calls in flight (grace %.0fs)",
                 signal.Signals(signum).name, config.grace)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    loop.add_signal_handler(signal.SIGHUP, server.reload_certificates)
    try:
        port = await server.start(config.metrics_port)
        # What exists by now (the program snapshot, SQLAlchemy's, gRPC's and protobuf's machinery: about 100k
        # objects) lives as long as the process: out of the cyclic collector's sight, a full collection no longer
        # walks it (under load that blocked the event loop for ~50 ms at a time: CalculateReceipt's p99).
        gc.freeze()
        # A request allocates a few hundred containers (receipt and answer dicts) that die with it: at the
        # default threshold (700) the young generation was collected every other request, and older ones
        # often behind it. 50,000 keeps a young collection to a few milliseconds of work, a few times a
        # second (CalculateReceipt against the echo server: about 0.68x -> 0.75x in interleaved runs).
        gc.set_threshold(50_000, 20, 100)
        if announce is not None:
            announce(f"listening on {host_port(config.host, port)}")
        log.info("worker %d (pid %d) serving on %s:%d", worker, os.getpid(), config.host, port)
        await stop.wait()
    finally:
        await server.stop()
        if own_service:
            service.close()
        log.info("worker %d stopped", worker)


def _worker_main(config: ServeConfig, worker: int, log_level: str) -> None:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)      # a reload while starting: nothing to reload yet (not death)
    configure_logging(log_level, config.log_format)
    try:
        asyncio.run(run_server(config, worker=worker))
    except ServiceError as exc:
        log.error("worker %d cannot start: %s", worker, exc.message)
        sys.exit(1)


def _reserve_port(host: str, port: int) -> socket.socket:
    """Bind (without listening) a SO_REUSEPORT socket on the port the workers will share: it turns port 0 into
    a real port, and holds that port against any process that does not opt into sharing it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


@contextlib.contextmanager
def _shared_metrics(config: ServeConfig):
    """With ``--metrics-port``, the workers' metrics through the parent (``metrics``' multi-process mode): the
    directory made ready before they start, the parent's HTTP server on the port; yields the workers' config
    and what to call with a worker's pid when it exits. Everything is undone on the way out."""
    if config.metrics_port is None:
        yield config, lambda pid: None
        return
    from loyalty.server import metrics
    path, made = metrics.prepare_multiprocess_dir()
    try:
        try:
            http = metrics.serve_multiprocess(config.host, config.metrics_port, path)
        except OSError as exc:
            raise OSError(exc.errno, f"metrics port {config.metrics_port}: {exc.strerror or exc}") from None
        log.info("metrics of all %d workers at http://%s:%d/metrics", config.workers, config.host,
                 config.metrics_port)
        try:
            yield dataclasses.replace(config, metrics_shared=True), lambda pid: metrics.forget_process(pid, path)
        finally:
            http.shutdown()
    finally:
        if made:
            os.environ.pop(metrics.MULTIPROC_ENV, None)
            metrics.remove_multiprocess_dir(path)


def _supervise(config: ServeConfig, announce, log_level: str) -> int:
    reserved = _reserve_port(config.host, config.port)
    config = dataclasses.replace(config, port=reserved.getsockname()[1], reuse_port=True)
    try:
        with _shared_metrics(config) as (config, exited):
            return _run_workers(config, announce, log_level, exited)
    finally:
        reserved.close()


def _run_workers(config: ServeConfig, announce, log_level: str, exited) -> int:
    """Start ``config.workers`` processes, forward SIGTERM / SIGINT to them, wait for all; ``exited(pid)`` as
    each ends."""
    ctx = multiprocessing.get_context("spawn")
    children = [ctx.Process(target=_worker_main, args=(config, i, log_level), name=f"loyalty-worker-{i}")
                for i in range(config.workers)]
    stopping = False

    def signal_children(signum, _frame):
        for child in children:
            if child.pid and child.is_alive():
                os.kill(child.pid, signum)

    def forward(signum, _frame):
        nonlocal stopping
        stopping = True
        signal_children(signum, _frame)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for child in children:
            child.start()           # SIGHUP is ignored here, and so in each child until its server takes it
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, signal_children)     # reload certificates
        if announce is not None:
            announce(f"listening on {host_port(config.host, config.port)} ({config.workers} worker processes)")
        rc = 0
        alive = list(children)
        while alive:
            ready = multiprocessing.connection.wait([c.sentinel for c in alive])
            for child in [c for c in alive if c.sentinel in ready]:
                child.join()
                alive.remove(child)
                exited(child.pid)
                if child.exitcode != 0 and not stopping:
                    # A worker died on its own: stop the others and fail, so the supervisor (systemd, k8s)
                    # restarts a whole, known-good set rather than a server quietly running on fewer workers.
                    log.error("%s exited with %s: stopping the other workers", child.name, child.exitcode)
                    rc = 1
                    forward(signal.SIGTERM, None)
        return rc
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def serve(config: ServeConfig, *, announce=None, log_level: str = "INFO") -> int:
    """Run the server in the foreground until signalled; returns the process exit code."""
    configure_logging(log_level, config.log_format)
    check_serving(config)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)      # until the server takes it (reload), SIGHUP must not kill
    if config.workers > 1:
        import multiprocessing.connection  # noqa: F401  (wait)
        return _supervise(config, announce, log_level)
    asyncio.run(run_server(config, announce=announce))
    return 0
