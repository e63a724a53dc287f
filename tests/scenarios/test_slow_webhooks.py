"""A live worker never hands a delivery to another (SPEC section 8): two ``loyalty worker`` processes, a lease of
one second and a webhook receiver that takes two seconds per call, on SQLite and PostgreSQL. Every webhook
arrives exactly once (no repeated Idempotency-Key), although each call outlasts the lease: the worker holding
a delivery keeps renewing it while the call runs, and claims the next one only when it is about to send it."""
from __future__ import annotations

import collections
import http.server
import threading
import time

from sqlalchemy import func, select

from helpers.scenarios import outbox, start_worker, stop
from loyalty.server import db
from loyalty.server.scenarios import ScenarioService
from loyalty.server.scenarios.models import scenario_outbox
from loyalty.v1 import processing_pb2 as P

CALL_S = 2.0
LEASE_S = 1.0
MEMBERS = 6


class SlowSink:
    """An HTTP receiver on loopback that takes ``delay`` seconds per call, answering several calls at once;
    records each call's Idempotency-Key as it arrives, and the most calls it had in flight at once."""

    def __init__(self, delay: float):
        self.keys: list[str] = []
        self.in_flight = self.most_in_flight = 0
        self.lock = threading.Lock()
        sink = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with sink.lock:
                    sink.keys.append(self.headers.get("Idempotency-Key"))
                    sink.in_flight += 1
                    sink.most_in_flight = max(sink.most_in_flight, sink.in_flight)
                time.sleep(delay)
                with sink.lock:
                    sink.in_flight -= 1
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_two_workers_send_each_slow_webhook_once_though_every_call_outlasts_the_lease(database_url):
    from loyalty.server.processing import ProcessingService
    sink = SlowSink(CALL_S)
    db.upgrade(database_url)
    service = ProcessingService.open(database_url)
    sc = ScenarioService(service.db)
    procs = []
    try:
        sc.define({"id": "hook", "triggers": ["member_registered"], "steps": [
            {"id": "call", "webhook": {"url": sink.url + "/crm"}}]})
        for i in range(MEMBERS):
            service.enroll_member(P.EnrollMemberRequest(card=f"81{i:05d}", source="api", phone=f"+7902{i:07d}",
                                                        profile=P.Profile(first_name="N")))
        procs = [start_worker(database_url, "--lease", str(LEASE_S)) for _ in range(2)]
        deadline = time.monotonic() + 90
        while True:
            with service.db.read() as conn:
                sent = conn.execute(select(func.count()).where(scenario_outbox.c.state == "sent")).scalar_one()
            if sent == MEMBERS or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        time.sleep(LEASE_S * 2)            # a stray second send of some delivery would arrive by now
    finally:
        for p in procs:
            stop(p)
        sink.close()
    try:
        rows = outbox(service.db, channel="webhook")
        assert [(r["state"], r["attempts"]) for r in rows] == [("sent", 1)] * MEMBERS
        repeats = {k: n for k, n in collections.Counter(sink.keys).items() if n > 1}
        assert repeats == {}, f"delivered more than once: {repeats}"
        assert sorted(sink.keys) == sorted(r["key"] for r in rows)
        print(f"most calls in flight at once: {sink.most_in_flight}")
    finally:
        service.close()
