"""Helpers of the scenario tests: the welcome scenario's file, enrolment, readers of the outbox, ledger,
balances and runs, a tiny HTTP sink and a tiny SMTP sink on loopback, and a worker subprocess that can be
SIGKILLed. Their fixtures (``scn``, ``http_sink``, ``smtp_sink``) are in ``tests/scenarios/conftest.py``."""
from __future__ import annotations

import datetime as dt
import http.server
import json
import os
import pathlib
import signal
import socketserver
import subprocess
import sys
import threading

from sqlalchemy import select

from loyalty.v1 import processing_pb2 as P


WELCOME = (pathlib.Path(__file__).resolve().parents[2] / "server" / "scenarios" / "examples" / "welcome.yaml")


def enroll(service, card: str, *, source="form", phone=None, email="", first_name="Anna", subs=None,
           birth_date=""):
    m = service.enroll_member(P.EnrollMemberRequest(
        card=card, source=source, phone=phone or "", subscriptions=subs or {},
        profile=P.Profile(first_name=first_name, email=email, birth_date=birth_date)))
    return int(m.member_id)


def outbox(db, **where):
    from loyalty.server.scenarios.models import scenario_outbox as ob
    stmt = select(ob).order_by(ob.c.id)
    for k, v in where.items():
        stmt = stmt.where(ob.c[k] == v)
    with db.read() as conn:
        return [dict(r._mapping) for r in conn.execute(stmt)]


def ledger_rows(db, member_id=None):
    from loyalty.server.models import ledger
    stmt = select(ledger.c.key, ledger.c.member_id, ledger.c.points).order_by(ledger.c.id)
    if member_id is not None:
        stmt = stmt.where(ledger.c.member_id == member_id)
    with db.read() as conn:
        return [tuple(r) for r in conn.execute(stmt)]


def active_points(db, member_id):
    from loyalty.server.models import balances
    with db.read() as conn:
        return conn.execute(select(balances.c.active).where(balances.c.member_id == member_id)).scalar_one()


def runs(db, scenario_id=None):
    from loyalty.server.scenarios.models import scenario_runs as r
    stmt = select(r).order_by(r.c.id)
    if scenario_id:
        stmt = stmt.where(r.c.scenario_id == scenario_id)
    with db.read() as conn:
        return [dict(x._mapping) for x in conn.execute(stmt)]


def message_event(db, member_id, channel, kind, at):
    from loyalty.server.segments.models import message_events
    with db.write() as conn:
        conn.execute(message_events.insert().values(member_id=member_id, channel=channel, kind=kind, at=at))


# ---- sinks on loopback --------------------------------------------------------------------------------------

class HttpSink:
    """Records every request body (JSON) and answers ``status`` (200 unless told)."""

    def __init__(self):
        self.requests: list[dict] = []
        self.status = 200
        sink = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                sink.requests.append({"path": self.path, "key": self.headers.get("Idempotency-Key"),
                                      "json": json.loads(body or b"null")})
                self.send_response(sink.status)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class SmtpSink:
    """A tiny SMTP server: enough of RFC 5321 (EHLO/HELO, MAIL, RCPT, DATA, RSET, NOOP, QUIT) for smtplib."""

    def __init__(self):
        self.messages: list[dict] = []
        sink = self

        class Handler(socketserver.StreamRequestHandler):
            def reply(self, line):
                self.wfile.write((line + "\r\n").encode())

            def handle(self):
                self.reply("220 sink ready")
                mail = {"from": None, "to": [], "data": ""}
                while True:
                    line = self.rfile.readline()
                    if not line:
                        return
                    cmd = line.decode().strip()
                    verb = cmd.split(" ", 1)[0].upper()
                    if verb in ("EHLO", "HELO"):
                        self.reply("250 sink")
                    elif verb == "MAIL":
                        mail["from"] = cmd[10:]
                        self.reply("250 ok")
                    elif verb == "RCPT":
                        mail["to"].append(cmd[8:])
                        self.reply("250 ok")
                    elif verb == "DATA":
                        self.reply("354 end with .")
                        lines = []
                        while True:
                            data = self.rfile.readline().decode()
                            if data in (".\r\n", ".\n", ""):
                                break
                            lines.append(data)
                        mail["data"] = "".join(lines)
                        sink.messages.append(dict(mail))
                        mail = {"from": None, "to": [], "data": ""}
                        self.reply("250 queued")
                    elif verb == "QUIT":
                        self.reply("221 bye")
                        return
                    else:
                        self.reply("250 ok")

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


# ---- worker subprocesses --------------------------------------------------------------------------------

def start_worker(url: str, *args: str) -> subprocess.Popen:
    """``loyalty worker`` in a subprocess (real clock), quiet, killable."""
    cmd = [sys.executable, "-c", "from loyalty.cli.main import main; main()", "worker", "--database-url", url,
           "--no-upgrade", "--poll", "0.05", *args]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            kill(proc)


def utc(*args) -> dt.datetime:
    return dt.datetime(*args, tzinfo=dt.timezone.utc)
