"""Who may be exposed: the loopback quick start runs without authentication and says so in one line; any
other address needs ``--auth required`` and TLS, or ``--insecure``, else ``loyalty serve`` refuses to start
with one line saying why; bad certificate files are refused the same way."""
from __future__ import annotations

import pytest

from serverutil import cli, start_server


def test_the_quick_start_says_auth_is_off_in_one_line(tmp_path):
    server = start_server(tmp_path)
    try:
        out = server.log_path.with_suffix(".out").read_text()
        lines = [line for line in out.splitlines() if line.startswith("auth:")]
        assert len(lines) == 1 and lines[0].startswith("auth: off (plaintext)")
        with server.client(retries=0) as client:                  # no credential needed
            assert client.get_member({"member": {"card": "7000001"}}).card == "7000001"
    finally:
        server.stop()


@pytest.mark.parametrize("args, words", [
    ((), ("0.0.0.0", "--auth required and TLS", "without TLS", "--insecure")),
    (("--auth", "required"), ("without TLS",)),
    (("--auth", "off", "--tls-cert", "{cert}", "--tls-key", "{key}"), ("without --auth required",)),
])
def test_a_public_address_without_auth_and_tls_is_refused(tmp_path, pki, args, words):
    args = [a.format(cert=pki.server.cert, key=pki.server.key) for a in args]
    result = cli("serve", "--host", "0.0.0.0", "--port", "0", "--data-dir", str(tmp_path / "d"), *args, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    for word in words:
        assert word in result.stderr
    assert not (tmp_path / "d" / "loyalty.db").exists()       # refused before anything was written


def test_a_public_address_with_auth_and_tls_or_insecure_starts(tmp_path, pki):
    public = pki.ca.issue("public", "localhost", server=True, ips=("127.0.0.1", "0.0.0.0"))  # the client dials 0.0.0.0
    tls = ("--tls-cert", str(public.cert), "--tls-key", str(public.key))
    for args, options in ((("--auth", "required", *tls), {"tls_ca": str(pki.ca.cert)}), (("--insecure",), {})):
        server = start_server(tmp_path, args=("--host", "0.0.0.0", *args), client_options=options)
        try:
            assert server.proc.poll() is None
        finally:
            assert server.stop() == 0


@pytest.mark.parametrize("which, words", [
    ("cert", ("--tls-cert", "not a PEM certificate")),
    ("key", ("--tls-key", "does not belong to the certificate")),
])
def test_bad_certificate_files_are_refused_at_start(tmp_path, pki, which, words):
    other = pki.ca.issue("other", "localhost", server=True)
    bad = tmp_path / "bad.pem"
    bad.write_text("hello")
    cert, key = (bad, pki.server.key) if which == "cert" else (pki.server.cert, other.key)
    result = cli("serve", "--port", "0", "--data-dir", str(tmp_path / "d"), "--tls-cert", str(cert),
                 "--tls-key", str(key))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    for word in words:
        assert word in result.stderr


def test_an_ipv6_loopback_address_serves_as_given(tmp_path):
    """``--host ::1`` (no brackets, as an operator writes it) binds and is announced as ``[::1]:PORT``."""
    server = start_server(tmp_path, args=("--host", "::1"))
    try:
        assert server.target.startswith("[::1]:")
        with server.client() as client:
            assert client.get_member({"member": {"card": "7000001"}}).card == "7000001"
    finally:
        assert server.stop() == 0
