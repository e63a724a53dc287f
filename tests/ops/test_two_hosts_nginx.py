"""Two server hosts behind nginx as a gRPC load balancer, sharing PostgreSQL and Redis (issue 14, several
hosts): tills confirm receipts through nginx, retrying with the same keys on UNAVAILABLE; one host is killed
(SIGKILL) mid-run; every receipt is confirmed exactly once (the balances grew by the sum of the answers, one
purchase per receipt, ``ledger check`` clean), and a program published through one host serves on the other
within a second.

The hosts are network namespaces joined to this one by veth pairs, which the test sets up itself (as root:
``ip netns``), each reaching PostgreSQL and Redis through a forwarder on its link's address; where namespaces
cannot be made, two loopback addresses (127.0.0.2, 127.0.0.3). nginx (Debian's package) runs as the test's user
from ``examples/nginx/loyalty-grpc.conf``, the configuration the README shows, with its pid, logs and temp files
in the test's directory. Without nginx the test skips, except under ``CI=true`` where it fails.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import os
import pathlib
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid

import grpc
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from helpers.storage import IN_CI, require_redis
from loyalty.clients.client import LoyaltyClient
from loyalty.server.demo import DEMO_PROGRAM_PATH
from serverutil import TcpProxy, cli, fresh_postgres_database, now_at, start_server

pytestmark = pytest.mark.postgres

TEMPLATE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "nginx" / "loyalty-grpc.conf"
RECEIPTS = 120
TILLS = 6
CARDS = ["7000001", "7000002", "7000003", "7000005"]     # the demo's members that earn (7000004 is blocked)
AT = now_at()       # one moment for every receipt, so a receipt sent again is the same receipt


def _nginx() -> str:
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
                                           if os.access(p, os.X_OK)), None)
    if found is None:
        reason = "nginx is not installed (Debian: apt-get install nginx-light); .ci/run installs it"
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)
    return found


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# ---- two hosts ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Host:
    address: str            # where it listens and nginx reaches it
    prefix: tuple           # the command that runs a process on it
    database_url: str       # PostgreSQL and Redis as this host reaches them
    redis_url: str


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=10)


def _namespaces_available() -> bool:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    probe = f"lyprobe{uuid.uuid4().hex[:6]}"
    try:
        _run("ip", "netns", "add", probe)
        _run("ip", "netns", "del", probe)
        return True
    except (subprocess.SubprocessError, OSError):
        return False


@contextlib.contextmanager
def _namespace_host(index: int, subnet: tuple[int, int], database_url: str, redis_url: str):
    """A network namespace joined to this one by a veth pair (``10.a.b.(4i+1)`` here, ``.(4i+2)`` there), with
    forwarders on this end to PostgreSQL and Redis."""
    tag = uuid.uuid4().hex[:6]
    ns, here, there = f"lyops-{tag}", f"ly{tag}h", f"ly{tag}n"
    near, far = f"10.{subnet[0]}.{subnet[1]}.{4 * index + 1}", f"10.{subnet[0]}.{subnet[1]}.{4 * index + 2}"
    proxies = []
    try:
        _run("ip", "netns", "add", ns)
        _run("ip", "link", "add", here, "type", "veth", "peer", "name", there)
        _run("ip", "link", "set", there, "netns", ns)
        _run("ip", "addr", "add", f"{near}/30", "dev", here)
        _run("ip", "link", "set", here, "up")
        for cmd in (("ip", "addr", "add", f"{far}/30", "dev", there), ("ip", "link", "set", there, "up"),
                    ("ip", "link", "set", "lo", "up")):
            _run("ip", "netns", "exec", ns, *cmd)
        pg_target, redis_target = make_url(database_url), make_url(redis_url)
        pg = TcpProxy(pg_target.host, pg_target.port or 5432, listen_host=near)
        redis = TcpProxy(redis_target.host, redis_target.port or 6379, listen_host=near)
        proxies += [pg, redis]
        yield Host(far, ("ip", "netns", "exec", ns),
                   pg_target.set(host=near, port=pg.port).render_as_string(hide_password=False),
                   redis_target.set(host=near, port=redis.port).render_as_string(hide_password=False))
    finally:
        for proxy in proxies:
            proxy.close()
        subprocess.run(("ip", "link", "del", here), capture_output=True)
        subprocess.run(("ip", "netns", "del", ns), capture_output=True)


@contextlib.contextmanager
def two_hosts(kind: str, database_url: str, redis_url: str):
    """Two hosts: network namespaces (``kind`` "netns") or two loopback addresses ("loopback")."""
    if kind == "netns":
        subnet = (random.randint(64, 127), random.randint(0, 255))
        with _namespace_host(0, subnet, database_url, redis_url) as a, \
                _namespace_host(1, subnet, database_url, redis_url) as b:
            yield [a, b]
    else:
        yield [Host(address, (), database_url, redis_url) for address in ("127.0.0.2", "127.0.0.3")]


@pytest.fixture(params=["netns", "loopback"])
def host_kind(request) -> str:
    """Namespaces when this process may make them (root), and loopback addresses, the fallback, always."""
    if request.param == "netns" and not _namespaces_available():
        pytest.skip("network namespaces need root and iproute2 (`ip netns`); the loopback variant runs")
    return request.param


# ---- nginx ----------------------------------------------------------------------------------------------------

def nginx_config(prefix: pathlib.Path, listen: str, servers: list[str]) -> str:
    """The README's template filled in."""
    upstream = "\n        ".join(f"server {s} max_fails=1 fail_timeout=5s;" for s in servers)
    return (TEMPLATE.read_text().replace("__PREFIX__", str(prefix)).replace("__LISTEN__", listen)
            .replace("__SERVERS__", upstream))


@contextlib.contextmanager
def nginx(tmp: pathlib.Path, servers: list[str]):
    """nginx in the foreground (``daemon off``) as this user, balancing ``servers``; yields its address."""
    binary = _nginx()
    prefix = tmp / "nginx"
    prefix.mkdir()
    listen = f"127.0.0.1:{_free_port()}"
    (prefix / "nginx.conf").write_text(nginx_config(prefix, listen, servers))
    cmd = [binary, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", str(prefix / "error.log")]
    if os.geteuid() == 0:
        cmd += ["-g", "user root;"]     # root's workers would otherwise become nobody, locked out of tmp
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(listen.rsplit(":", 1), timeout=0.2):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nginx did not start: {proc.stderr.read().decode()}"
                                   f"{(prefix / 'error.log').read_text() if (prefix / 'error.log').exists() else ''}")
            time.sleep(0.05)
        yield listen
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---- the tills ------------------------------------------------------------------------------------------------

class CountCodes(grpc.UnaryUnaryClientInterceptor):
    """Counts the status codes the tills' attempts end with (UNAVAILABLE ones are retried)."""

    def __init__(self):
        self.codes: dict[grpc.StatusCode, int] = {}
        self._lock = threading.Lock()

    def intercept_unary_unary(self, continuation, details, request):
        outcome = continuation(details, request)
        with self._lock:
            self.codes[outcome.code()] = self.codes.get(outcome.code(), 0) + 1
        return outcome


def _receipt(number: int) -> dict:
    return {"store": "msk-01", "terminal": f"till-{number % TILLS}", "number": f"nginx-{number}", "at": AT,
            "lines": [{"sku": "milk-1l", "categories": ["dairy"], "quantity": 1000 * (1 + number % 3),
                       "price": 8990},
                      {"sku": "coffee-beans-1kg", "categories": ["coffee"], "quantity": 1000, "price": 89900}]}


def _served_by(host_log: str) -> int:
    return host_log.count("ConfirmPurchase OK")


def _published_version_reaches(other: LoyaltyClient, version: int, within: float) -> float:
    """Seconds until ``other`` calculates with program ``version`` (fails after ``within`` + 2 s)."""
    request = {"receipt": _receipt(0)}
    t0 = time.monotonic()
    while time.monotonic() - t0 < within + 2:
        if other.calculate_receipt(request).answer.program_version == version:
            return time.monotonic() - t0
        time.sleep(0.01)
    pytest.fail(f"program version {version} not served by the other host after {within + 2:g}s")


def test_two_hosts_behind_nginx_lose_and_double_nothing_when_one_dies(tmp_path, host_kind):
    _nginx()
    redis_url = require_redis()
    kind = host_kind
    with fresh_postgres_database() as url, two_hosts(kind, url, redis_url) as hosts:
        servers = [start_server(tmp_path, database_url=h.database_url, prefix=h.prefix,
                                args=("--host", h.address, "--auth", "off", "--insecure", "--redis-url", h.redis_url))
               for h in hosts]
        try:
            targets = [s.target for s in servers]
            with nginx(tmp_path, targets) as front:
                # a program published through host A serves on host B within a second (Redis announces it)
                with LoyaltyClient(targets[0]) as a, LoyaltyClient(targets[1]) as b:
                    before = b.calculate_receipt({"receipt": _receipt(0)}).answer.program_version
                    published = a.publish_program({"yaml": DEMO_PROGRAM_PATH.read_text() + "\n# nginx test\n",
                                                   "comment": "two hosts"})
                    assert published.version == before + 1
                    took = _published_version_reaches(b, published.version, within=1.0)
                    assert took <= 1.0, f"{kind}: host B served version {published.version} after {took:.2f}s"
                    start_points = {card: b.get_member({"member": {"card": card}}).pending_points for card in CARDS}

                counter = CountCodes()
                client = LoyaltyClient(front, timeout=5, retries=30, backoff=0.05, max_backoff=0.5,
                                       interceptors=(counter,))
                answers: dict[int, object] = {}
                killed = threading.Event()

                def till(number: int):
                    if number == RECEIPTS // 3:          # a third of the way in, host A dies
                        servers[0].proc.send_signal(signal.SIGKILL)
                        killed.set()
                    answers[number] = client.confirm_purchase(
                        {"member": {"card": CARDS[number % len(CARDS)]}, "receipt": _receipt(number)})

                try:
                    with concurrent.futures.ThreadPoolExecutor(TILLS) as pool:
                        list(pool.map(till, range(RECEIPTS)))
                finally:
                    client.close()
                assert killed.is_set() and servers[0].proc.wait(5) == -signal.SIGKILL

                with LoyaltyClient(targets[1]) as b:
                    end_points = {card: b.get_member({"member": {"card": card}}).pending_points for card in CARDS}
                    # a retry with the same key is the stored answer, not a second purchase
                    again = b.confirm_purchase({"member": {"card": CARDS[1]}, "receipt": _receipt(1)})
                    assert again.replayed and again.purchase_id == answers[1].purchase_id
        finally:
            for s in servers:
                s.stop()

        # exactly once: one purchase per receipt, the balances grew by the sum of the answers, the ledger adds up
        assert len(answers) == RECEIPTS
        assert len({a.purchase_id for a in answers.values()}) == RECEIPTS
        earned = {card: 0 for card in CARDS}
        for number, answer in answers.items():
            earned[CARDS[number % len(CARDS)]] += answer.answer.totals.accrued_points
        assert all(a.answer.totals.accrued_points > 0 for a in answers.values())
        assert {c: end_points[c] - start_points[c] for c in CARDS} == earned
        check = cli("ledger", "check", "--database-url", url)
        assert check.returncode == 0, check.stdout + check.stderr
        purchases = _count_purchases(url)
        assert purchases == RECEIPTS

    # both hosts served before the kill; the tills saw the dead host's calls fail and retried them
    logs = [s.log() for s in servers]
    assert _served_by(logs[0]) >= 1 and _served_by(logs[1]) >= 1, kind
    assert counter.codes.get(grpc.StatusCode.OK) == RECEIPTS
    assert set(counter.codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, counter.codes
    print(f"{kind}: attempts {counter.codes}; host A confirmed {_served_by(logs[0])}, B {_served_by(logs[1])}")


def _count_purchases(url: str) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(text("SELECT count(*) FROM purchases WHERE number LIKE 'nginx-%'")).scalar_one()
    finally:
        engine.dispose()


def test_the_readme_shows_the_configuration_the_test_runs():
    readme = (TEMPLATE.parents[2] / "README.md").read_text()
    assert TEMPLATE.read_text().strip() in readme
