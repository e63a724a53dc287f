"""ConfirmPurchase in process: ``ProcessingService.confirm_purchase`` from N threads, no gRPC.

    python benchmarks/confirm.py [--backend postgres|sqlite|both] [--threads 8] [--duration 3]
                                 [--warmup 0.5] [--members 64] [--lines 20] [--redeem 0] [--group-commit N]
                                 [--profile] [--json]

Each backend gets a fresh database (PostgreSQL: ``CREATE DATABASE loyalty_bench_<random>``, dropped after;
SQLite: a temp file), migrated, with the demo program published and ``--members`` members enrolled (each
credited points when ``--redeem`` asks to spend some). Then ``--threads`` threads call ``confirm_purchase``
back to back for ``--duration`` seconds after ``--warmup``: the 20-line receipt of ``benchmarks/server.py``
with a unique number per call, spread over the members. Every error is counted; after the run the ledger
check must be empty. Prints confirms/s, p50 and p99 per backend (``--json``: one JSON line each), the CPU
per confirm of this process and (local PostgreSQL, Linux) of the database's backends, and with group commit
(``--group-commit N``, PostgreSQL only) the mean batch size.

``--profile`` runs the measured part under cProfile (every thread) and prints the top functions by their own
time; the figures then are slower, use it to see where the time goes, not for throughput.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import pathlib
import sys
import tempfile
import threading
import time
import uuid

PG_ADMIN = os.environ.get("LOYALTY_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
AT = "2026-03-02T12:30:00+03:00"


def fixed_lines(n: int = 20) -> list[dict]:
    import importlib.util
    # benchmarks/server.py's receipt, so that the in-process and the gRPC figures measure the same work
    spec = importlib.util.spec_from_file_location("_bench_server", pathlib.Path(__file__).parent / "server.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    lines = module.fixed_lines()
    while len(lines) < n:
        lines = lines + lines
    return lines[:n]


def setup(url: str, members: int, points: int):
    from loyalty.server import db
    from loyalty.server.processing import ProcessingService
    from loyalty.v1 import admin_pb2
    from loyalty.v1 import processing_pb2 as P
    from loyalty.v1 import receipt_pb2 as R

    db.upgrade(url)
    svc = ProcessingService.open(url)
    yaml_text = (pathlib.Path(db.__file__).parent / "demo" / "program.yaml").read_text(encoding="utf-8")
    svc.publish_program(admin_pb2.PublishProgramRequest(yaml=yaml_text, comment="bench"))
    for i in range(members):
        card = f"bench-{i:04d}"
        svc.enroll_member(P.EnrollMemberRequest(card=card, request_id=card))
        if points:
            svc.adjust_points(P.AdjustPointsRequest(member=R.MemberRef(card=card), kind="credit", points=points,
                                                    reason="opening balance", operation_id=f"open:{card}"))
    return svc


def run(svc, *, threads: int, duration: float, warmup: float, members: int, lines: int, redeem: int,
        profile: bool, pg_name: str | None = None) -> dict:
    from loyalty.server.errors import ServiceError
    from loyalty.v1 import processing_pb2 as P

    line_dicts = fixed_lines(lines)
    seed = uuid.uuid4().hex[:6]
    start = time.perf_counter()
    t_measure, t_end = start + warmup, start + warmup + duration
    results = [None] * threads
    profiles = []
    barrier = threading.Barrier(threads)

    def worker(i: int):
        import cProfile
        latencies, errors = [], {}
        prof = cProfile.Profile() if profile else None
        n = 0
        barrier.wait()
        while True:
            req = P.ConfirmPurchaseRequest(
                member={"card": f"bench-{(i * 7919 + n) % members:04d}"},
                receipt={"store": "msk-01", "terminal": f"bench-{seed}-{i}", "number": str(n), "at": AT,
                         "redeem_points": redeem, "lines": line_dicts})
            n += 1
            t0 = time.perf_counter()
            if t0 >= t_end:
                break
            measuring = t0 >= t_measure
            if prof is not None and measuring:
                prof.enable()
            try:
                svc.confirm_purchase(req)
                code = None
            except ServiceError as exc:
                code = exc.code
            except Exception as exc:  # noqa: BLE001 - counted, the run goes on
                code = type(exc).__name__
            t1 = time.perf_counter()
            if prof is not None and measuring:
                prof.disable()
            if measuring:
                if code is None:
                    latencies.append(t1 - t0)
                else:
                    errors[code] = errors.get(code, 0) + 1
        results[i] = (latencies, errors, n - 1)
        if prof is not None:
            profiles.append(prof)

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    cpu0, pg0 = time.process_time(), pg_backend_cpu(pg_name)
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    cpu, pg1 = time.process_time() - cpu0, pg_backend_cpu(pg_name)
    latencies = sorted(x for r in results for x in r[0])
    errors: dict[str, int] = {}
    for r in results:
        for k, v in r[1].items():
            errors[k] = errors.get(k, 0) + v

    def pct(q):
        return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000, 3) if latencies else None

    out = {"confirms_per_s": round(len(latencies) / duration, 1), "ok": len(latencies),
           "errors": sum(errors.values()), "error_codes": errors, "p50_ms": pct(0.5), "p99_ms": pct(0.99),
           "threads": threads, "duration_s": duration, "lines": lines, "redeem": redeem,
           "process_cpu_ms_per_confirm": round(cpu * 1000 / max(1, n_total(results)), 3),
           "pg_cpu_ms_per_confirm": (round((pg1 - pg0) * 1000 / max(1, n_total(results)), 3)
                                     if pg0 is not None and pg1 is not None else None)}
    if profiles:
        import pstats
        stats = pstats.Stats(profiles[0])
        for p in profiles[1:]:
            stats.add(p)
        stats.sort_stats("tottime").print_stats(35)
    return out


def pg_backend_cpu(dbname: str | None) -> float | None:
    """CPU seconds (user + system) of the local PostgreSQL backends connected to ``dbname`` (Linux /proc; None
    elsewhere): with the process's own CPU, what one confirm costs the machine."""
    if not dbname or not os.path.isdir("/proc"):
        return None
    total, tick = 0, os.sysconf("SC_CLK_TCK")
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
            if not cmd.startswith(b"postgres:") or f" {dbname} ".encode() not in cmd:
                continue
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / tick


def n_total(results) -> int:
    """Every confirm made, warm-up included (the CPU time covers the whole run)."""
    return sum(r[2] for r in results)


def fresh_pg() -> tuple[str, str]:
    import psycopg
    name = f"loyalty_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name, PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1) + f"/{name}"


def drop_pg(name: str) -> None:
    import psycopg
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("postgres", "sqlite", "both"), default="both")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--members", type=int, default=64)
    parser.add_argument("--lines", type=int, default=20)
    parser.add_argument("--redeem", type=int, default=0, help="points each receipt asks to spend")
    parser.add_argument("--group-commit", type=int, default=None, metavar="N",
                        help="PostgreSQL: confirms per transaction at most (0: off; default $LOYALTY_CONFIRM_BATCH)")
    parser.add_argument("--profile", action="store_true", help="cProfile the measured part")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.group_commit is not None:
        os.environ["LOYALTY_CONFIRM_BATCH"] = str(args.group_commit)

    from loyalty.core import COMPILED
    from loyalty.server import ledger

    backends = ("postgres", "sqlite") if args.backend == "both" else (args.backend,)
    rows = []
    for backend in backends:
        pg_name = None
        with tempfile.TemporaryDirectory(prefix="loyalty-confirm-") as tmp:
            if backend == "postgres":
                pg_name, url = fresh_pg()
            else:
                url = f"sqlite:///{pathlib.Path(tmp) / 'bench.db'}"
            svc = None
            try:
                # enough points for every receipt the run can make, so a redeeming run measures the
                # successful path (FailedPrecondition would be counted as an error)
                svc = setup(url, args.members, 10**9 if args.redeem else 0)
                r = run(svc, threads=args.threads, duration=args.duration, warmup=args.warmup,
                        members=args.members, lines=args.lines, redeem=args.redeem, profile=args.profile,
                        pg_name=pg_name)
                problems = ledger.check(svc.db)
                batcher = svc.confirmation.batcher
                if batcher is not None:
                    r.update(batches=batcher.batches, mean_batch=round(batcher.items / max(1, batcher.batches), 2))
                r.update(backend=backend, ledger_problems=len(problems), compiled_core=COMPILED,
                         at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
                rows.append(r)
                print(json.dumps(r), flush=True)
            finally:
                if svc is not None:
                    svc.close()
                if pg_name:
                    drop_pg(pg_name)
    if not args.json:
        print(f"\n{'backend':<10}{'threads':>8}{'batch':>6}{'confirms/s':>12}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}"
              f"{'cpu ms':>8}{'pg ms':>7}{'ledger':>8}", file=sys.stderr)
        for r in rows:
            print(f"{r['backend']:<10}{r['threads']:>8}{r.get('mean_batch', 1):>6}{r['confirms_per_s']:>12.1f}"
                  f"{r['p50_ms'] or 0:>9.2f}{r['p99_ms'] or 0:>9.2f}{r['errors']:>8}"
                  f"{r['process_cpu_ms_per_confirm']:>8.2f}{r['pg_cpu_ms_per_confirm'] or 0:>7.2f}"
                  f"{'ok' if not r['ledger_problems'] else r['ledger_problems']:>8}", file=sys.stderr)
    return 1 if any(r["errors"] or r["ledger_problems"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
