"""How a client reaches the server: the channel's TLS credentials and the call metadata that carries who is
calling. Shared by :mod:`loyalty.clients.client`, the ``loyalty`` CLI and ``loyalty-pos``.

- ``api_key`` or ``token`` (an OIDC access token): sent on every call as ``authorization: Bearer <it>``
  (not both: a call has one caller).
- ``tls_ca``: the PEM file of the CA that signed the server's certificate (a private CA); ``tls=True`` with
  no ``tls_ca`` trusts the system's roots. ``tls_cert`` / ``tls_key``: the client's own certificate for mutual
  TLS. Any of them makes the channel TLS; none, a plaintext channel (the loopback quick start).
"""
from __future__ import annotations

import pathlib

import grpc

__all__ = ["auth_metadata", "channel_credentials", "connection_options"]


def auth_metadata(api_key: str | None = None, token: str | None = None) -> tuple[tuple[str, str], ...]:
    if api_key and token:
        raise ValueError("give an API key or a token, not both")
    credential = api_key or token
    return (("authorization", f"Bearer {credential}"),) if credential else ()


def _read(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return pathlib.Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{what} {path}: {exc.strerror or exc}") from None


def channel_credentials(tls_ca: str | None = None, tls_cert: str | None = None, tls_key: str | None = None,
                        tls: bool = False) -> grpc.ChannelCredentials | None:
    """TLS credentials, or None for a plaintext channel."""
    if not (tls or tls_ca or tls_cert or tls_key):
        return None
    if bool(tls_cert) != bool(tls_key):
        raise ValueError("a client certificate needs both tls_cert and tls_key")
    return grpc.ssl_channel_credentials(root_certificates=_read(tls_ca, "tls_ca"),
                                        private_key=_read(tls_key, "tls_key"),
                                        certificate_chain=_read(tls_cert, "tls_cert"))


def connection_options(kwargs: dict) -> tuple[grpc.ChannelCredentials | None, tuple[tuple[str, str], ...]]:
    """Take the connection keywords (``api_key``, ``token``, ``tls_ca``, ``tls_cert``, ``tls_key``, ``tls``)
    out of a client's ``kwargs``: ``(channel credentials or None, metadata to send)``."""
    names = ("tls_ca", "tls_cert", "tls_key", "tls")
    credentials = channel_credentials(**{name: kwargs.pop(name) for name in names if name in kwargs})
    return credentials, auth_metadata(kwargs.pop("api_key", None), kwargs.pop("token", None))
