"""TLS on the gRPC port, mutual TLS with registered client certificates, and a certificate reloaded on SIGHUP,
against real ``loyalty serve`` processes and a CA of the test's own (``helpers.pki``)."""
from __future__ import annotations

import re
import signal
import socket
import ssl
import time

import grpc
import pytest
from cryptography import x509

from helpers.pki import CA
from helpers.security import expect_status
from loyalty.clients.client import LoyaltyClient, LoyaltyError
from loyalty.server.db import Database
from loyalty.server.security.keys import create_key, revoke_key
from serverutil import start_server

CARD = {"card": "7000001"}


def served_serial(port: int, ca_file) -> int:
    """The serial number of the certificate a new TLS connection to the port is shown."""
    context = ssl.create_default_context(cafile=str(ca_file))
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).serial_number


def register(url: str, subject: str, *scopes: str, stores=()) -> dict:
    db = Database(url, pool_size=1)
    try:
        return create_key(db, name=subject, scopes=scopes, stores=stores, kind="certificate")[0]
    finally:
        db.engine.dispose()


def test_tls_serves_clients_that_trust_the_ca_and_no_one_else(tmp_path, pki):
    args = ("--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key))
    server = start_server(tmp_path, args=args, client_options={"tls_ca": str(pki.ca.cert)})
    try:
        with server.client(retries=0) as client:
            assert client.get_member({"member": CARD}).card == "7000001"
        with LoyaltyClient(server.target, retries=0, timeout=3) as plaintext, \
                pytest.raises(LoyaltyError) as info:
            plaintext.get_member({"member": CARD})
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
        stranger = CA(tmp_path / "other", "Other CA")
        with LoyaltyClient(server.target, retries=0, timeout=3, tls_ca=str(stranger.cert)) as untrusting, \
                pytest.raises(LoyaltyError) as info:
            untrusting.get_member({"member": CARD})
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()


def test_mutual_tls_identifies_a_registered_terminal_by_its_certificate(tmp_path, pki):
    args = ("--auth", "required", "--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key),
            "--tls-client-ca", str(pki.ca.cert))
    till = {"tls_ca": str(pki.ca.cert), "tls_cert": str(pki.till.cert), "tls_key": str(pki.till.key)}
    server = start_server(tmp_path, args=args, client_options=till)
    try:
        with server.client(retries=0) as client:
            with expect_status("UNAUTHENTICATED", "CN=till-7,O=Shop", "not registered"):
                client.get_member({"member": CARD})
            row = register(server.database_url, pki.till.subject, "pos", stores=["msk-01"])
            time.sleep(0.6)                                   # the server's poll
            assert client.get_member({"member": CARD}).card == "7000001"
            with expect_status("PERMISSION_DENIED", "receipt.store", "CN=till-7,O=Shop", "spb-02"):
                client.calculate_receipt({"member": CARD, "receipt": {
                    "store": "spb-02", "terminal": "t", "number": "n", "at": "2026-03-02T12:30:00+03:00",
                    "lines": [{"sku": "a", "quantity": 1000, "price": 100}]}})
            with expect_status("PERMISSION_DENIED", "PublishProgram"):
                client.publish_program({"yaml": "x"})
            db = Database(server.database_url, pool_size=1)
            revoke_key(db, row["id"])
            db.engine.dispose()
            time.sleep(0.6)
            with expect_status("UNAUTHENTICATED", "not registered"):
                client.get_member({"member": CARD})
        no_cert = {"tls_ca": str(pki.ca.cert)}
        with LoyaltyClient(server.target, retries=0, timeout=3, **no_cert) as anonymous, \
                pytest.raises(LoyaltyError) as info:
            anonymous.get_member({"member": CARD})
        assert info.value.code == grpc.StatusCode.UNAVAILABLE          # refused in the handshake
        foreign = CA(tmp_path / "foreign", "Foreign CA").issue("till-9", "till-7")
        with LoyaltyClient(server.target, retries=0, timeout=3, tls_ca=str(pki.ca.cert), tls_cert=str(foreign.cert),
                           tls_key=str(foreign.key)) as impostor, pytest.raises(LoyaltyError) as info:
            impostor.get_member({"member": CARD})
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()


def test_sighup_reloads_the_certificate_for_new_connections(tmp_path, pki):
    cert, key = tmp_path / "live.crt", tmp_path / "live.key"
    cert.write_bytes(pki.server.cert.read_bytes())
    key.write_bytes(pki.server.key.read_bytes())
    server = start_server(tmp_path, args=("--tls-cert", str(cert), "--tls-key", str(key)),
                          client_options={"tls_ca": str(pki.ca.cert)})
    try:
        assert served_serial(server.port, pki.ca.cert) == pki.server.serial
        renewed = pki.ca.issue("renewed", "localhost", server=True)
        cert.write_bytes(renewed.cert.read_bytes())
        key.write_bytes(renewed.key.read_bytes())
        assert served_serial(server.port, pki.ca.cert) == pki.server.serial     # nothing changes before SIGHUP
        server.signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while served_serial(server.port, pki.ca.cert) != renewed.serial:
            assert time.monotonic() < deadline, "the renewed certificate was not served after SIGHUP"
            time.sleep(0.1)
        cert.write_text("not a certificate")                                     # a bad reload keeps the old
        server.signal(signal.SIGHUP)
        time.sleep(0.5)
        assert served_serial(server.port, pki.ca.cert) == renewed.serial
        assert "certificate reload refused" in server.log()
        with server.client(retries=0) as client:
            assert client.get_member({"member": CARD}).card == "7000001"
        assert server.proc.poll() is None
    finally:
        server.stop()


def test_sighup_reaches_every_worker_and_never_kills_one_still_starting(tmp_path, pki):
    server = start_server(tmp_path, workers=2, args=("--tls-cert", str(pki.server.cert), "--tls-key",
                                                     str(pki.server.key)),
                          client_options={"tls_ca": str(pki.ca.cert)}, every_worker=False)
    try:
        server.signal(signal.SIGHUP)                     # one worker may still be starting
        deadline = time.monotonic() + 30
        while len(set(re.findall(r"\[(\d+)\] certificates reloaded", server.log()))) < 2:     # both workers
            assert server.proc.poll() is None, server.log()
            assert time.monotonic() < deadline, server.log()
            server.signal(signal.SIGHUP)
            time.sleep(0.5)
        assert "exited with" not in server.log()
        with server.client(retries=0) as client:
            assert client.get_member({"member": CARD}).card == "7000001"
    finally:
        assert server.stop() == 0
