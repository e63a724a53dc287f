"""``loyalty.v1.Keys`` over gRPC (scope admin): each method is one call of ``security.keys`` on the server's
database, announced through Redis when the server has it (every process also polls: within a second).

Not retried by the CLI: a create or a rotation sent twice would make two keys (harmless, both listed, either
revocable), so the ``keys`` commands send each once and say so when the answer is lost.
"""
from __future__ import annotations

from loyalty.server.grpc_register import register_servicer
from loyalty.server.paging import page_of, paged
from loyalty.v1 import security_pb2

from .keys import ROTATION_GRACE_S, create_key, list_keys, redis_announcer, revoke_key, rotate_key

__all__ = ["KeysServicer", "add_keys_service", "SERVICE_NAME"]

SERVICE_NAME = "loyalty.v1.Keys"


def _info(row: dict) -> security_pb2.KeyInfo:
    return security_pb2.KeyInfo(**{name: value or "" for name, value in row.items()
                                   if name not in ("scopes", "stores")},
                                scopes=row["scopes"], stores=row["stores"])


class KeysServicer:
    def __init__(self, db, *, redis_url: str | None = None):
        self.db = db
        self.announce = redis_announcer(redis_url)

    def create_key(self, request: security_pb2.CreateKeyRequest) -> security_pb2.CreatedKey:
        row, secret = create_key(self.db, name=request.name, scopes=list(request.scopes),
                                 stores=list(request.stores), kind="certificate" if request.certificate else "key",
                                 announce=self.announce)
        return security_pb2.CreatedKey(key=_info(row), secret=secret or "")

    def list_keys(self, request: security_pb2.ListKeysRequest) -> security_pb2.ListKeysResponse:
        page = page_of(request, "keys", (str, str))
        rows, token = paged(list_keys(self.db, include_revoked=request.include_revoked), page,
                            key=lambda row: (str(row["created_at"]), row["id"]))
        return security_pb2.ListKeysResponse(keys=[_info(row) for row in rows], next_page_token=token)

    def revoke_key(self, request: security_pb2.KeyRef) -> security_pb2.KeyInfo:
        return _info(revoke_key(self.db, request.id, announce=self.announce))

    def rotate_key(self, request: security_pb2.RotateKeyRequest) -> security_pb2.CreatedKey:
        grace = request.grace_seconds if request.HasField("grace_seconds") else ROTATION_GRACE_S
        row, secret = rotate_key(self.db, request.id, grace_s=grace, announce=self.announce)
        return security_pb2.CreatedKey(key=_info(row), secret=secret)


def add_keys_service(server, service, *, redis_url: str | None = None) -> None:
    """Serve ``loyalty.v1.Keys`` on ``server`` over the database of ``service`` (a ProcessingService)."""
    register_servicer(server, security_pb2, "Keys", KeysServicer(service.db, redis_url=redis_url))
