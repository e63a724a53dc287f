"""The server under load, against a bare echo server on the same machine (STYLE section 6).

    python benchmarks/server.py [--duration 3] [--concurrency 32] [--processes 2] [--json] [--no-postgres]
                                [--secure]

Starts ``loyalty serve`` on SQLite (a temp data dir, demo seeded) and, unless ``--no-postgres``, on a fresh
PostgreSQL database; beside it ``loyalty.server.echo`` answering the very bytes the real server answers to the
fixed request. One load generator drives every scenario the same way: ``--processes`` processes, each with
``--channels`` connections and grpc.aio coroutines (``--concurrency`` in all) calling back to back for
``--duration`` seconds after a short warm-up, on loopback. The PostgreSQL server runs ``--pg-workers``
processes (default: one per core, as in production); the SQLite server and the echo server run one. Scenarios:

- ``echo``: CalculateReceipt against the echo server (the cost of gRPC in Python alone);
- ``calculate``: CalculateReceipt, a fixed 20-line receipt for demo member 7000001 (no side effects);
- ``confirm_sqlite`` / ``confirm_postgres``: ConfirmPurchase of the same 20 lines with a unique receipt
  number per call, spread over 64 members enrolled for the run (many customers at many terminals); every
  error is counted;
- ``calculate_secure`` (``--secure``): ``calculate`` against a second SQLite server (the same one process)
  with ``--auth required`` and TLS, each call over TLS with a store-bound ``pos`` API key; the summary's
  ``calculate_secure_rps_vs_calculate`` is the median of the rounds' own ratios (target: >= 0.9, i.e.
  authentication and TLS together cost at most 10% of calculate's RPS);
- ``confirm_postgres_limits``: the same on a second PostgreSQL server whose program sets every operation limit
  (``operation_limits``, soft and hard, far above what the run reaches: every figure is counted and checked,
  nothing is refused or recorded); its summary ratio is against ``confirm_postgres`` of the same round.

Runs every scenario ``--rounds`` times, interleaved (echo, calculate, confirm_sqlite, confirm_postgres, then
again), and prints one JSON line per scenario and round (``--json``: only those, plus a final summary line)
and a table of each scenario's median round with RPS, p50, p99 and the ratios against echo (the median of
each round's own ratio: a shared machine drifts over minutes, rounds seconds apart do not). Targets: calculate >= 70% of echo's RPS with p99 <= 2x echo's;
confirm_postgres >= 1,000/s with zero errors. Absolute numbers move with the machine; the ratios are the claim.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import pathlib
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid

AT = "2026-03-02T12:30:00+03:00"
PG_ADMIN = os.environ.get("LOYALTY_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
MEMBERS = 64


def fixed_lines() -> list[dict]:
    """20 lines a supermarket receipt might have: pieces and weight goods over the demo program's groups."""
    goods = [("milk-1l", "dairy", 8990), ("cheese-200", "dairy", 45000), ("coffee-beans-1kg", "coffee", 89900),
             ("bread-white", "bread", 5490), ("apple-gala", "fruit", 18900)]
    lines = []
    for i in range(20):
        sku, cat, price = goods[i % len(goods)]
        weight = cat == "fruit"
        lines.append({"sku": f"{sku}" if i < 5 else f"{sku}-{i}", "categories": [cat],
                      "quantity": 1234 if weight else 1000 * (1 + i % 3), "price": price + 10 * i})
    return lines


# ---- load generator (runs in fresh processes) -----------------------------------------------------------------

def request_maker(scenario: str, seed: str):
    """``make(i, n) -> bytes``: the request of coroutine ``i``'s ``n``-th call. CalculateReceipt: the same fixed
    request every time; ConfirmPurchase: the same 20 lines under a unique receipt number (nine digits) for one of
    ``MEMBERS`` cards. The bytes are built once and only the digits change (every request has the same length),
    so that the generator spends its CPU on gRPC rather than on building the same message again: on 2 shared
    cores whatever it spends is taken from the server under test."""
    from loyalty.v1 import processing_pb2

    lines = fixed_lines()
    if scenario in ("echo", "calculate"):
        fixed = processing_pb2.CalculateReceiptRequest(
            member={"card": "7000001"},
            receipt={"store": "msk-01", "terminal": "bench", "number": "calc", "at": AT, "lines": lines},
        ).SerializeToString()
        return lambda i, n: fixed

    def template(i: int) -> tuple[bytes, int, int]:
        data = processing_pb2.ConfirmPurchaseRequest(
            member={"card": "bench-@@@@"},
            receipt={"store": "msk-01", "terminal": f"bench-{seed}-{i}", "number": "#########", "at": AT,
                     "lines": lines}).SerializeToString()
        return data, data.index(b"@@@@"), data.index(b"#########")

    templates: dict[int, tuple[bytes, int, int]] = {}

    def make(i: int, n: int) -> bytes:
        t = templates.get(i) or templates.setdefault(i, template(i))
        data, at_card, at_number = t
        return b"".join((data[:at_card], b"%04d" % ((i * 7919 + n) % MEMBERS), data[at_card + 4:at_number],
                         b"%09d" % n, data[at_number + 9:]))
    return make


def _generator(target: str, scenario: str, workers: int, duration: float, warmup: float, seed: str, out,
               channels: int = 1, secure: dict | None = None) -> None:
    """``secure``: ``{"ca": PEM file, "key": API key}``: TLS channels and the key on every call."""
    import grpc

    make = request_maker(scenario, seed)

    method = "/loyalty.v1.Processing/" + ("CalculateReceipt" if scenario in ("echo", "calculate") else
                                          "ConfirmPurchase")

    async def main():
        # several connections per process, as several terminals of a store would have (the coroutines share
        # them round-robin); with --workers the kernel spreads connections, not calls, over the processes
        options = [("grpc.use_local_subchannel_pool", 1)]
        if secure:
            tls = grpc.ssl_channel_credentials(pathlib.Path(secure["ca"]).read_bytes())
            opened = [grpc.aio.secure_channel(target, tls, options=options) for _ in range(max(1, channels))]
        else:
            opened = [grpc.aio.insecure_channel(target, options=options) for _ in range(max(1, channels))]
        metadata = (("authorization", f"Bearer {secure['key']}"),) if secure else None
        calls = [ch.unary_unary(method) for ch in opened]   # bytes in, bytes out: the generator decodes nothing
        latencies: list[float] = []
        errors: dict[str, int] = {}
        start = time.perf_counter()
        t_measure, t_end = start + warmup, start + warmup + duration

        async def worker(i: int):
            call = calls[i % len(calls)]
            n = 0
            while True:
                payload = make(i, n)
                n += 1
                t0 = time.perf_counter()
                if t0 >= t_end:
                    return
                try:
                    await call(payload, timeout=30, metadata=metadata)
                    ok = True
                except grpc.RpcError as exc:
                    ok = False
                    code = exc.code().name
                t1 = time.perf_counter()
                if t0 >= t_measure:
                    if ok:
                        latencies.append(t1 - t0)
                    else:
                        errors[code] = errors.get(code, 0) + 1

        await asyncio.gather(*(worker(i) for i in range(workers)))
        for ch in opened:
            await ch.close()
        out.put({"latencies": latencies, "errors": errors, "duration": duration})

    asyncio.run(main())


def drive(target: str, scenario: str, *, processes: int, concurrency: int, duration: float, warmup: float,
          channels: int = 1, secure: dict | None = None) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    run_id = uuid.uuid4().hex[:6]
    share = [concurrency // processes + (1 if i < concurrency % processes else 0) for i in range(processes)]
    procs = [ctx.Process(target=_generator, args=(target, scenario, share[i], duration, warmup,
                                                  f"{run_id}{i}", queue, channels, secure))
             for i in range(processes)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=duration + warmup + 120) for _ in procs]
    for p in procs:
        p.join()
    latencies = sorted(x for r in results for x in r["latencies"])
    errors: dict[str, int] = {}
    for r in results:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v

    def pct(q):
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else None

    return {"scenario": scenario, "rps": round(len(latencies) / duration, 1), "ok": len(latencies),
            "errors": sum(errors.values()), "error_codes": errors,
            "p50_ms": round(pct(0.50), 3) if latencies else None, "p99_ms": round(pct(0.99), 3) if latencies else None,
            "concurrency": concurrency, "processes": processes, "channels": channels, "duration_s": duration}


# ---- servers --------------------------------------------------------------------------------------------------

class Proc:
    def __init__(self, cmd: list[str], log: pathlib.Path, env=None):
        self.log = log
        self.out = log.with_suffix(".out")
        with open(log, "wb") as err, open(self.out, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, env={**os.environ, **(env or {})})
        deadline = time.monotonic() + 90
        while True:
            m = re.search(r"listening on (\S+:\d+)", self.out.read_text(errors="replace"))
            if m:
                self.target = m.group(1)
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{cmd[:6]} did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.05)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# The demo program with every operation limit set out of reach (the figures are still read and checked).
LIMITS_PROGRAM = (pathlib.Path(__file__).resolve().parents[1] / "server" / "demo" / "program.yaml").read_text() + """
operation_limits:
  card_daily_writeoff_points: {soft: 999999999999, hard: 1000000000000}
  card_daily_confirms: {soft: 999999999999, hard: 1000000000000}
  terminal_confirms_per_minute: {soft: 999999999999, hard: 1000000000000}
"""


def start_loyalty(tmp: pathlib.Path, name: str, database_url: str | None, log_level: str, workers: int = 1,
                  secure: dict | None = None, program: str | None = None) -> Proc:
    """``loyalty serve`` with the demo and ``MEMBERS`` enrolled; ``secure`` (``secure_setup``): with
    ``--auth required`` and TLS, its clients using the CA and the key; ``program``: published instead of the
    demo's."""
    cmd = [sys.executable, "-c", "from loyalty.cli.main import main; main()", "serve", "--port", "0", "--demo",
           "--data-dir", str(tmp / name), "--log-level", log_level, "--workers", str(workers)]
    if database_url:
        cmd += ["--database-url", database_url]
    if secure:
        cmd += ["--auth", "required", "--tls-cert", secure["cert"], "--tls-key", secure["tls_key"]]
    proc = Proc(cmd, tmp / f"{name}.log")
    from loyalty.clients.client import LoyaltyClient
    options = {"tls_ca": secure["ca"], "api_key": secure["key"]} if secure else {}
    with LoyaltyClient(proc.target, timeout=30, **options) as client:
        client.wait_ready(30)
        if program is not None:
            client.publish_program({"yaml": program, "comment": "benchmark"})
        for i in range(MEMBERS):
            client.enroll_member({"card": f"bench-{i:04d}", "request_id": f"bench-{i:04d}"})
    return proc


def secure_setup(tmp: pathlib.Path, name: str) -> dict:
    """A CA and a server certificate for 127.0.0.1 (the tests' ``helpers.pki``), and a ``pos`` +
    ``integration`` key bound to store msk-01 made on the data dir of server ``name`` before it starts."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
    from helpers.pki import CA
    ca = CA(tmp / "pki")
    server = ca.issue("server", "localhost", server=True)
    subprocess.run([sys.executable, "-c", "from loyalty.cli.main import main; main()", "db", "upgrade",
                    "--data-dir", str(tmp / name)], capture_output=True, text=True, check=True)
    made = subprocess.run([sys.executable, "-c", "from loyalty.cli.main import main; main()", "keys", "create",
                           "--name", "bench-till", "--scope", "pos", "--scope", "integration", "--store", "msk-01",
                           "--data-dir", str(tmp / name), "--json"], capture_output=True, text=True, check=True)
    return {"ca": str(ca.cert), "cert": str(server.cert), "tls_key": str(server.key),
            "key": json.loads(made.stdout)["key"]}


def fresh_pg_database() -> tuple[str | None, str | None]:
    try:
        import psycopg
        name = f"loyalty_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name, PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1) + f"/{name}"
    except Exception as exc:  # noqa: BLE001
        print(f"PostgreSQL unavailable, skipping confirm_postgres: {exc}", file=sys.stderr)
        return None, None


def drop_pg_database(name: str) -> None:
    import psycopg
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=3.0, help="measured seconds per scenario and round")
    parser.add_argument("--rounds", type=int, default=3, help="every scenario this many times, interleaved")
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--processes", type=int, default=2, help="load generator processes")
    parser.add_argument("--channels", type=int, default=4, help="connections per load generator process")
    parser.add_argument("--pg-workers", type=int, default=os.cpu_count() or 1,
                        help="server processes on PostgreSQL (the production setup: one per core); the SQLite "
                             "server and echo run one")
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--log-level", default="WARNING", help="of the servers under test")
    parser.add_argument("--json", action="store_true", help="JSON lines only")
    parser.add_argument("--secure", action="store_true",
                        help="add calculate_secure: TLS and an API key, beside calculate in every round")
    args = parser.parse_args(argv)

    from loyalty.core import COMPILED
    from loyalty.v1 import processing_pb2

    def emit(obj):
        print(json.dumps(obj), flush=True)

    results, rounds = {}, {}
    with tempfile.TemporaryDirectory(prefix="loyalty-bench-") as tmpdir:
        tmp = pathlib.Path(tmpdir)
        procs = []
        pg_names: list = []
        try:
            sqlite = start_loyalty(tmp, "sqlite", None, args.log_level)
            procs.append(sqlite)
            from loyalty.clients.client import LoyaltyClient
            with LoyaltyClient(sqlite.target) as client:
                calc = processing_pb2.CalculateReceiptRequest(
                    member={"card": "7000001"},
                    receipt={"store": "msk-01", "terminal": "bench", "number": "calc", "at": AT,
                             "lines": fixed_lines()})
                response = client.calculate_receipt(calc).SerializeToString()
            (tmp / "response.bin").write_bytes(response)
            echo = Proc([sys.executable, "-m", "loyalty.server.echo", "--port", "0",
                         "--response", str(tmp / "response.bin")], tmp / "echo.log")
            procs.append(echo)
            common = dict(processes=args.processes, concurrency=args.concurrency, duration=args.duration,
                          warmup=args.warmup, channels=args.channels)
            targets = [("echo", "echo", echo.target, None), ("calculate", "calculate", sqlite.target, None)]
            if args.secure:
                secure = secure_setup(tmp, "secure")
                locked = start_loyalty(tmp, "secure", None, args.log_level, secure=secure)
                procs.append(locked)
                targets.append(("calculate_secure", "calculate", locked.target, secure))
            targets.append(("confirm_sqlite", "confirm", sqlite.target, None))
            if not args.no_postgres:
                pg_name, pg_url = fresh_pg_database()
                pg_names.append(pg_name)
                if pg_url:
                    pg = start_loyalty(tmp, "postgres", pg_url, args.log_level, workers=args.pg_workers)
                    procs.append(pg)
                    targets.append(("confirm_postgres", "confirm", pg.target, None))
                limits_name, limits_url = fresh_pg_database()
                if limits_url:
                    pg_names.append(limits_name)
                    limited = start_loyalty(tmp, "postgres-limits", limits_url, args.log_level,
                                            workers=args.pg_workers, program=LIMITS_PROGRAM)
                    procs.append(limited)
                    targets.append(("confirm_postgres_limits", "confirm", limited.target, None))
            # Rounds: every scenario once per round, in the same order, so that each round's echo and calculate
            # run seconds apart on the same machine; a scenario's figure is its median round, the ratios are
            # the medians of the rounds' own ratios (a shared, noisy machine drifts between minutes).
            for r in range(args.rounds):
                for name, scenario, target, secure in targets:
                    result = drive(target, scenario, secure=secure, **common)
                    result.update(scenario=name, round=r + 1)
                    rounds.setdefault(name, []).append(result)
                    emit(result)
        finally:
            for p in reversed(procs):
                p.stop()
            for name in filter(None, pg_names):
                drop_pg_database(name)

    for name, runs in rounds.items():
        median = sorted(runs, key=lambda x: x["rps"])[len(runs) // 2]
        results[name] = dict(median, round="median", rounds_rps=[x["rps"] for x in runs],
                             errors=sum(x["errors"] for x in runs))
    echo = results["echo"]

    def paired(name, key, base="echo"):
        """The median over rounds of ``name``'s ``key`` against ``base``'s in the same round."""
        ratios = sorted(a[key] / b[key] for a, b in zip(rounds[name], rounds[base]) if a[key] and b[key])
        return round(ratios[len(ratios) // 2], 3) if ratios else None

    summary = {
        "summary": True, "rounds": args.rounds,
        "calculate_rps_vs_echo": paired("calculate", "rps"),
        "calculate_p99_vs_echo": paired("calculate", "p99_ms"),
        "response_bytes": len(response), "compiled_core": COMPILED,
        "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
        "grpcio": __import__("grpc").__version__, "pg_workers": args.pg_workers,
    }
    for name in ("confirm_sqlite", "confirm_postgres"):
        if name in results:
            summary[f"{name}_rps_vs_echo"] = paired(name, "rps")
    if "confirm_postgres_limits" in results and "confirm_postgres" in results:
        summary["confirm_postgres_limits_rps_vs_confirm_postgres"] = paired("confirm_postgres_limits", "rps",
                                                                            "confirm_postgres")
        summary["confirm_postgres_limits_p99_vs_confirm_postgres"] = paired("confirm_postgres_limits", "p99_ms",
                                                                            "confirm_postgres")
    summary["targets"] = {
        "calculate_rps_ge_70pct_echo": bool(summary["calculate_rps_vs_echo"] and summary["calculate_rps_vs_echo"] >= 0.7),
        "calculate_p99_le_2x_echo": bool(summary["calculate_p99_vs_echo"] and summary["calculate_p99_vs_echo"] <= 2.0),
    }
    if "calculate_secure" in results:
        summary["calculate_secure_rps_vs_calculate"] = paired("calculate_secure", "rps", "calculate")
        summary["calculate_secure_p99_vs_calculate"] = paired("calculate_secure", "p99_ms", "calculate")
        summary["targets"]["calculate_secure_ge_90pct_calculate"] = bool(
            summary["calculate_secure_rps_vs_calculate"] and summary["calculate_secure_rps_vs_calculate"] >= 0.9)
    if "confirm_postgres" in results:
        r = results["confirm_postgres"]
        summary["targets"]["confirm_postgres_ge_1000_rps_no_errors"] = r["rps"] >= 1000 and r["errors"] == 0
    emit(summary)
    if not args.json:
        print(file=sys.stderr)
        print(f"median of {args.rounds} interleaved rounds of {args.duration:g} s; ratios: median of each round's "
              f"own ratio to echo", file=sys.stderr)
        print(f"{'scenario':<18}{'rps':>10}{'p50 ms':>10}{'p99 ms':>10}{'errors':>8}{'rps/echo':>10}{'p99/echo':>10}"
              f"  rounds rps", file=sys.stderr)
        for name, r in results.items():
            rr, pr = paired(name, "rps") or 0, paired(name, "p99_ms") or 0
            print(f"{name:<18}{r['rps']:>10.0f}{r['p50_ms'] or 0:>10.2f}{r['p99_ms'] or 0:>10.2f}{r['errors']:>8}"
                  f"{rr:>10.2f}{pr:>10.2f}  {' / '.join(f'{x:.0f}' for x in r['rounds_rps'])}", file=sys.stderr)
        print(f"targets: {summary['targets']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
