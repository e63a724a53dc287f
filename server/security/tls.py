"""TLS on the gRPC port: the server's certificate and key, optionally a CA whose client certificates it
requires (mutual TLS), all re-read on SIGHUP without dropping a connection.

grpc's dynamic server credentials ask a fetcher before every new handshake whether the certificate changed;
ours answers None (no change, a single attribute read) until :meth:`Certificates.reload` has read and checked
new files, and then hands the new configuration over once. Connections already open keep the certificate they
were made with. Files that do not load, or a key that does not belong to the certificate, are refused at
start (the server does not start) and on reload (the old certificate stays, the log says why).
"""
from __future__ import annotations

import dataclasses
import logging
import pathlib

import grpc

from loyalty.server.errors import InvalidArgument

__all__ = ["TlsFiles", "Certificates", "check"]

log = logging.getLogger("loyalty.server.security.tls")


@dataclasses.dataclass(frozen=True)
class TlsFiles:
    cert: str
    key: str
    client_ca: str | None = None     # set: every client must present a certificate this CA signed


def _read(path: str, option: str) -> bytes:
    try:
        return pathlib.Path(path).read_bytes()
    except OSError as exc:
        raise InvalidArgument(option, f"{path}: {exc.strerror or exc}") from None


def _load(files: TlsFiles) -> grpc.ServerCertificateConfiguration:
    """Read and check the files; the configuration grpc serves."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert, key = _read(files.cert, "--tls-cert"), _read(files.key, "--tls-key")
    try:
        certificate = x509.load_pem_x509_certificate(cert)
    except ValueError:
        raise InvalidArgument("--tls-cert", f"{files.cert}: not a PEM certificate") from None
    try:
        private = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError):
        raise InvalidArgument("--tls-key", f"{files.key}: not an unencrypted PEM private key") from None
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if (private.public_key().public_bytes(serialization.Encoding.PEM, spki)
            != certificate.public_key().public_bytes(serialization.Encoding.PEM, spki)):
        raise InvalidArgument("--tls-key", f"{files.key}: does not belong to the certificate {files.cert}")
    ca = None
    if files.client_ca:
        ca = _read(files.client_ca, "--tls-client-ca")
        try:
            x509.load_pem_x509_certificates(ca)
        except ValueError:
            raise InvalidArgument("--tls-client-ca", f"{files.client_ca}: not PEM certificates") from None
    return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)


def check(files: TlsFiles) -> None:
    """``InvalidArgument`` naming the option when the files cannot serve (checked before workers start)."""
    _load(files)


class Certificates:
    """The server credentials of ``files`` (checked now), reloaded by :meth:`reload`."""

    def __init__(self, files: TlsFiles):
        self.files = files
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self.credentials = grpc.dynamic_ssl_server_credentials(
            _load(files), self._fetch, require_client_authentication=bool(files.client_ca))

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by grpc before every handshake: the new configuration once after a reload, else None."""
        pending, self._pending = self._pending, None
        return pending

    def reload(self) -> bool:
        """Re-read the files (SIGHUP); new connections get them. False (and a log line) when they are bad."""
        try:
            self._pending = _load(self.files)
        except InvalidArgument as exc:
            log.error("certificate reload refused, keeping the current one: %s", exc.message)
            return False
        log.info("certificates reloaded from %s", self.files.cert)
        return True
