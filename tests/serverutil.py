"""Real servers for the API tests: ``loyalty serve`` in a subprocess on a free loopback port, over SQLite in a
temp data dir or over a fresh PostgreSQL database, waited for until health says SERVING; and a small TCP
proxy to put between the server and PostgreSQL, to cut and restore the database link without touching the
real PostgreSQL.

PostgreSQL tests: ``fresh_postgres_database()`` skips with the reason when PostgreSQL does not answer, except
with ``CI=true`` where it fails (CI must never pass by skipping).
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from helpers.storage import IN_CI, create_database, drop_database  # noqa: F401 - IN_CI for the tests
from loyalty.clients.client import LoyaltyClient



class ServerProcess:
    def __init__(self, proc: subprocess.Popen, target: str, log_path: pathlib.Path, database_url: str,
                 client_options: dict | None = None):
        self.proc = proc
        self.client_options = client_options or {}      # e.g. tls_ca= for a TLS server
        self.target = target
        self.port = int(target.rsplit(":", 1)[1])
        self.log_path = log_path
        self.database_url = database_url

    def client(self, **kwargs) -> LoyaltyClient:
        return LoyaltyClient(self.target, **{**self.client_options, **kwargs})

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, signum=signal.SIGTERM) -> None:
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def now_at(**ago) -> str:
    """The local time of a receipt printed now (Moscow, ``+03:00``; ``ago``: a ``timedelta``'s keywords back):
    such a receipt's points wait out the program's return window (SPEC 6), as at a real till."""
    import datetime as dt
    moscow = dt.timezone(dt.timedelta(hours=3))
    return (dt.datetime.now(moscow) - dt.timedelta(**ago)).replace(microsecond=0).isoformat()


def cli(*args: str, env=None, timeout: float = 60, cwd=None) -> subprocess.CompletedProcess:
    """Run ``loyalty ARGS...`` as a user would; returns the completed process (text stdout/stderr). ``env``
    entries are added to the environment; a ``None`` value removes that variable."""
    return _run("loyalty.cli.main", "loyalty", args, env, timeout, cwd)


def pos(*args: str, env=None, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``loyalty-pos ARGS...`` as ``cli`` runs ``loyalty``."""
    return _run("loyalty.clients.pos", "loyalty-pos", args, env, timeout, None)


# The variables the CLI reads, removed (with ``env=CLEAN_CLI_ENV``) so a test sees no one's own setup.
CLEAN_CLI_ENV = {name: None for name in ("LOYALTY_SERVER", "LOYALTY_DATABASE_URL", "LOYALTY_DATA_DIR",
                                         "LOYALTY_HOME", "LOYALTY_TRACEBACK")}


def environment(env=None) -> dict:
    """This process's environment with ``env`` added (a ``None`` value removes that variable)."""
    merged = {**os.environ, **(env or {})}
    return {k: v for k, v in merged.items() if v is not None}


def _run(module: str, name: str, args, env, timeout, cwd) -> subprocess.CompletedProcess:
    code = f"from {module} import main; main(prog_name={name!r})"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=environment(env))


def start_server(tmp_path: pathlib.Path, *, database_url: str | None = None, workers: int = 1,
                 args: tuple = (), timeout: float = 60.0, client_options: dict | None = None,
                 prefix: tuple = (), every_worker: bool = True, demo: bool | None = True,
                 data_dir: pathlib.Path | None = None) -> ServerProcess:
    """``loyalty serve --port 0`` (demo seeded) in a subprocess; returns once it is SERVING (and, with several
    ``workers`` and ``every_worker``, once each has said it serves). ``client_options``:
    the ``LoyaltyClient`` keywords its clients need (``tls_ca=`` when ``args`` turn TLS on). ``prefix``: a
    command to run it under (``ip netns exec NAME``: on another network host). ``demo``: ``--demo`` (True),
    ``--no-demo`` (False) or neither (None: serve's default); ``data_dir``: a given one (a restart), else new."""
    data_dir = data_dir or tmp_path / f"data-{uuid.uuid4().hex[:6]}"
    log_path = tmp_path / f"server-{uuid.uuid4().hex[:6]}.log"
    out_path = log_path.with_suffix(".out")
    cmd = [*prefix, sys.executable, "-c", "from loyalty.cli.main import main; main()", "serve", "--port", "0",
           "--data-dir", str(data_dir), *{True: ("--demo",), False: ("--no-demo",), None: ()}[demo],
           "--workers", str(workers), "--grace", "10", *args]
    if database_url:
        cmd += ["--database-url", database_url]
    with open(log_path, "wb") as err, open(out_path, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, start_new_session=True)
    deadline = time.monotonic() + timeout
    target = None
    while target is None:
        text = out_path.read_text(errors="replace")
        m = re.search(r"listening on (\S+:\d+)", text)
        if m:
            target = m.group(1)
            break
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"server did not start (rc={proc.poll()}):\n{text}\n{log_path.read_text()}")
        time.sleep(0.05)
    server = ServerProcess(proc, target, log_path, database_url or f"sqlite:///{data_dir / 'loyalty.db'}",
                           client_options)
    with server.client() as client:
        client.wait_ready(timeout=max(1.0, deadline - time.monotonic()))
    # one worker answering is not all of them: on a loaded machine the others may still be starting, and a test
    # of "every worker" would then talk to one
    expected = range(workers if workers > 1 and every_worker else 0)
    while not all(f"worker {i} (pid" in server.log() for i in expected):
        if proc.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"not every one of {workers} workers started:\n{server.log()}")
        time.sleep(0.05)
    return server


# ---- PostgreSQL -----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def fresh_postgres_database(*, migrated: bool = True):
    """A new database ``loyalty_test_<random>`` on the test PostgreSQL, dropped afterwards; yields its SQLAlchemy
    URL. ``migrated`` (the default): a copy of the test run's migrated template (``helpers.storage``), so the
    server's own upgrade at start is a no-op; else empty. Skips (fails in CI) when PostgreSQL is down."""
    url = create_database(migrated=migrated)
    try:
        yield url
    finally:
        drop_database(url)


# Both storage backends, for ``@pytest.fixture(params=BACKENDS)``: a server test runs on each.
BACKENDS = ("sqlite", pytest.param("postgres", marks=pytest.mark.postgres))


@contextlib.contextmanager
def server_on(backend: str, tmp_path: pathlib.Path, **kwargs):
    """A started ``loyalty serve`` (``start_server``) on ``backend``: SQLite in ``tmp_path``, or a fresh PostgreSQL
    database (``fresh_postgres_database``); stopped (and the database dropped) on exit."""
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(fresh_postgres_database()) if backend == "postgres" else None
        srv = start_server(tmp_path, database_url=url, **kwargs)
        stack.callback(srv.stop)
        yield srv


# ---- a TCP proxy we can cut -----------------------------------------------------------------------------------

class TcpProxy:
    """Forwards 127.0.0.1:<port> (or ``listen_host``'s) to ``target``. ``cut()`` drops every open connection and
    refuses new ones (accepts and closes at once, as a dead link does); ``restore()`` forwards again. ``hang()`` stops
    forwarding while keeping every connection open and taking new ones (a database that stopped answering);
    ``lose_commit_reply(then_cut=...)`` lets the next COMMIT a client sends reach the server, drops that
    connection before the server's reply gets back, and (``then_cut``) refuses new connections."""

    def __init__(self, target_host: str, target_port: int, listen_host: str = "127.0.0.1"):
        self.target = (target_host, target_port)
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((listen_host, 0))
        self.listener.listen(128)
        self.port = self.listener.getsockname()[1]
        self.up = True
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._closed = False
        self.hanging = False
        self.commits_lost = 0
        self._lose_commit: bool | None = None       # armed: whether to stay cut after losing the reply
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._pairs.append((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        wrote = False                   # the client sent a write since its last COMMIT
        try:
            while True:
                readable, _, _ = select.select([a, b], [], [], 0.05 if self.hanging else 0.5)
                if self.hanging:
                    continue
                for src in readable:
                    data = src.recv(65536)
                    if not data:
                        raise OSError
                    (b if src is a else a).sendall(data)
                    if src is not a:
                        continue
                    upper = data.upper()
                    wrote = wrote or b"INSERT INTO" in upper
                    if b"COMMIT" not in upper:
                        continue
                    if not wrote or self._lose_commit is None:
                        wrote = False
                        continue
                    stay_cut, self._lose_commit = self._lose_commit, None
                    time.sleep(0.3)             # the server commits; its reply is never relayed
                    self.commits_lost += 1
                    self.lost_data = bytes(data[:400])
                    if stay_cut:
                        self.cut()
                    raise OSError
        except (OSError, ValueError):
            pass
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.close()

    def cut(self) -> None:
        self.up = False
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for s in pair:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    s.close()

    def restore(self) -> None:
        self.up = True
        self.hanging = False

    def hang(self) -> None:
        self.hanging = True

    def lose_commit_reply(self, *, then_cut: bool = False) -> None:
        self._lose_commit = then_cut

    def close(self) -> None:
        self._closed = True
        self.cut()
        self.listener.close()


def pg_url_through(url: str, proxy: TcpProxy) -> str:
    return re.sub(r"@[^/]+/", f"@127.0.0.1:{proxy.port}/", url, count=1)
