"""Security on the command line: ``loyalty keys ...``, the options of ``loyalty serve`` that secure the port,
and the options with which every command that calls a server says who it is.

``keys`` commands work through a running server (``--server`` with an admin credential: the
``loyalty.v1.Keys`` RPCs) or on the database (``--database-url`` / ``--data-dir``, like ``db upgrade``): that
is how the first admin key is made (bootstrap: whoever can write the database is already trusted with
everything). Every server process sees a change within a second (``--redis-url``: at once).
"""
from __future__ import annotations

import click

from loyalty.cli.common import call, check_server, database_url_option, fail, json_option, resolve_url
from loyalty.cli.output import emit_json, emit_table, error_exit

__all__ = ["register", "serve_security_options", "security_config", "client_options", "connect"]

_CONNECTION: dict = {}


# ---- who calls: every command that calls a server -------------------------------------------------------------

def _remember(ctx, param, value):
    if value is not None:
        _CONNECTION[param.name] = value
    return value


def client_options(fn):
    """``--api-key`` / ``--token`` / ``--tls-ca`` / ``--tls-cert`` / ``--tls-key`` (and their LOYALTY_*
    environment variables), kept for :func:`connect`."""
    common = {"expose_value": False, "callback": _remember, "metavar": "FILE", "type": click.Path(dir_okay=False)}
    options = [
        click.option("--api-key", envvar="LOYALTY_API_KEY", metavar="KEY", expose_value=False, callback=_remember,
                     help="API key sent as `authorization: Bearer` [env LOYALTY_API_KEY]."),
        click.option("--token", envvar="LOYALTY_TOKEN", metavar="JWT", expose_value=False, callback=_remember,
                     help="OIDC access token sent as `authorization: Bearer` [env LOYALTY_TOKEN]."),
        click.option("--tls-ca", envvar="LOYALTY_TLS_CA", **common,
                     help="Use TLS, trusting the CA in FILE (PEM) [env LOYALTY_TLS_CA]."),
        click.option("--tls-cert", envvar="LOYALTY_TLS_CERT", **common,
                     help="Client certificate for mutual TLS (with --tls-key) [env LOYALTY_TLS_CERT]."),
        click.option("--tls-key", envvar="LOYALTY_TLS_KEY", **common, help="Its private key [env LOYALTY_TLS_KEY]."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def connect(target: str, **kwargs):
    """A ``LoyaltyClient`` of ``target`` with the options given; a file that cannot be read, or both
    ``--api-key`` and ``--token``, is one line and exit 2."""
    from loyalty.clients.client import LoyaltyClient
    if _CONNECTION.get("api_key") and _CONNECTION.get("token"):
        error_exit("--api-key / --token: give one of them, not both")
    try:
        return LoyaltyClient(target, **kwargs, **_CONNECTION)
    except ValueError as exc:
        error_exit(str(exc))


# ---- loyalty serve --------------------------------------------------------------------------------------------

def serve_security_options(fn):
    options = [
        click.option("--auth", type=click.Choice(["required", "off"]), default=None,
                     help="required: every call but health carries a credential (API key, OIDC token or client "
                          "certificate) [default: off on loopback, required elsewhere]."),
        click.option("--tls-cert", metavar="FILE", type=click.Path(dir_okay=False),
                     help="Serve TLS with this certificate (PEM; reloaded on SIGHUP)."),
        click.option("--tls-key", metavar="FILE", type=click.Path(dir_okay=False), help="Its private key (PEM)."),
        click.option("--tls-client-ca", metavar="FILE", type=click.Path(dir_okay=False),
                     help="Require client certificates signed by this CA (mutual TLS); a registered certificate "
                          "(`loyalty keys create --certificate`) identifies its terminal."),
        click.option("--insecure", is_flag=True,
                     help="Allow a non-loopback --host without --auth required and TLS (trusted network only)."),
        click.option("--reflection", type=click.Choice(["admin", "open", "off"]), default="admin",
                     show_default=True, help="Server reflection: admin credentials only, anyone, or not served."),
        click.option("--oidc-issuer", metavar="URL", help="Accept access tokens of this OIDC issuer."),
        click.option("--oidc-audience", metavar="AUD", help="The audience tokens must name (needs the issuer too)."),
        click.option("--oidc-role", "oidc_roles", multiple=True, metavar="ROLE=SCOPE", envvar="LOYALTY_OIDC_ROLE",
                     help="A token role granting a scope, e.g. ops=admin; repeatable."),
        click.option("--oidc-client", metavar="CLIENT",
                     help="Whose resource_access roles count [default: the audience]."),
        click.option("--oidc-refresh", type=click.FloatRange(min=0), default=30.0, show_default=True,
                     help="Seconds between fetches of the issuer's keys when an unknown kid arrives."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _role_map(items) -> dict[str, list[str]]:
    from loyalty.server.security import SCOPES
    roles: dict[str, list[str]] = {}
    for item in items:
        role, eq, scope = item.partition("=")
        if not eq or not role or scope not in SCOPES:
            error_exit(f"--oidc-role: expected ROLE=SCOPE with SCOPE one of {', '.join(SCOPES)}, got {item!r}")
        roles.setdefault(role, []).append(scope)
    return roles


def security_config(host: str, options: dict) -> dict:
    """The ServeConfig fields of the security options (popped from ``options``); bad combinations exit 2."""
    from loyalty.server.security.edge import is_loopback
    from loyalty.server.security.tls import TlsFiles

    auth = options.pop("auth") or ("off" if is_loopback(host) else "required")
    cert, key, client_ca = options.pop("tls_cert"), options.pop("tls_key"), options.pop("tls_client_ca")
    if bool(cert) != bool(key):
        error_exit("--tls-cert / --tls-key: give both")
    if client_ca and not cert:
        error_exit("--tls-client-ca: needs --tls-cert and --tls-key")
    issuer, audience = options.pop("oidc_issuer"), options.pop("oidc_audience")
    roles, client, refresh = _role_map(options.pop("oidc_roles")), options.pop("oidc_client"), options.pop("oidc_refresh")
    if bool(issuer) != bool(audience):
        error_exit("--oidc-issuer / --oidc-audience: give both")
    if (issuer or client_ca) and auth != "required":
        error_exit("--oidc-issuer / --tls-client-ca: only mean something with --auth required")
    oidc = ({"issuer": issuer, "audience": audience, "roles": roles, "client": client, "refresh_interval": refresh}
            if issuer else None)
    return {"auth": auth, "tls": TlsFiles(cert, key, client_ca) if cert else None,
            "insecure": options.pop("insecure"), "reflection": options.pop("reflection"), "oidc": oidc}


def describe_security(config) -> str:
    """The one line ``loyalty serve`` prints about who may call."""
    channel = "TLS" + (" with client certificates" if config.tls and config.tls.client_ca else "") \
        if config.tls else "plaintext"
    if config.auth == "off":
        return (f"auth: off ({channel}): every caller may call every RPC; fine on loopback, "
                f"see `loyalty serve --help` for --auth required")
    accepted = "API keys" + (", OIDC tokens" if config.oidc else "") + \
        (", client certificates" if config.tls and config.tls.client_ca else "")
    return f"auth: required ({accepted}; {channel})"


# ---- loyalty keys ---------------------------------------------------------------------------------------------

class _OnDatabase:
    """The key functions of ``security.keys`` on the database."""

    def __init__(self, database_url, redis_url):
        from loyalty.server.db import Database, upgrade
        from loyalty.server.security.keys import redis_announcer
        url = resolve_url(database_url)
        call(upgrade, url)
        self.db = call(Database, url)
        self.announce = redis_announcer(redis_url)

    # Each change as the Keys service would be asked for it, so its audit row has the request's digest as a
    # change made through a server has.
    def create(self, **fields) -> tuple[dict, str | None]:
        from loyalty.server.security import audit
        from loyalty.server.security.keys import create_key
        from loyalty.v1 import security_pb2
        request = security_pb2.CreateKeyRequest(name=fields["name"], scopes=fields["scopes"], stores=fields["stores"],
                                                certificate=fields["kind"] == "certificate")
        with audit.calling("CreateKey", request):
            return call(create_key, self.db, announce=self.announce, **fields)

    def list(self, include_revoked: bool) -> list[dict]:
        from loyalty.server.security.keys import list_keys
        return call(list_keys, self.db, include_revoked=include_revoked)

    def revoke(self, key_id: str) -> dict:
        from loyalty.server.security import audit
        from loyalty.server.security.keys import revoke_key
        from loyalty.v1 import security_pb2
        with audit.calling("RevokeKey", security_pb2.KeyRef(id=key_id)):
            return call(revoke_key, self.db, key_id, announce=self.announce)

    def rotate(self, key_id: str, grace: float) -> tuple[dict, str]:
        from loyalty.server.security import audit
        from loyalty.server.security.keys import rotate_key
        from loyalty.v1 import security_pb2
        with audit.calling("RotateKey", security_pb2.RotateKeyRequest(id=key_id, grace_seconds=grace)):
            return call(rotate_key, self.db, key_id, grace_s=grace, announce=self.announce)


class _OnServer:
    """The same through ``loyalty.v1.Keys`` (sent once each: a create or rotation is not retried)."""

    def __init__(self, server: str):
        from loyalty.v1 import security_pb2_grpc
        self.client = connect(server, timeout=10.0, retries=0)
        self.stub = security_pb2_grpc.KeysStub(self.client.channel)

    def _call(self, rpc: str, request):
        import grpc

        from loyalty.clients.client import LoyaltyError
        try:
            return getattr(self.stub, rpc)(request, timeout=self.client.timeout, metadata=self.client.metadata)
        except grpc.RpcError as err:
            fail(LoyaltyError.from_rpc_error(err, err.trailing_metadata(), 1))

    @staticmethod
    def _row(info) -> dict:
        from loyalty.clients.client import to_dict
        return {name: (value if value != "" else None) for name, value in to_dict(info).items()}

    def create(self, *, name, scopes, stores, kind) -> tuple[dict, str | None]:
        from loyalty.v1 import security_pb2
        made = self._call("CreateKey", security_pb2.CreateKeyRequest(
            name=name, scopes=scopes, stores=stores, certificate=kind == "certificate"))
        return self._row(made.key), made.secret or None

    def list(self, include_revoked: bool) -> list[dict]:
        from loyalty.v1 import security_pb2
        listing = self._call("ListKeys", security_pb2.ListKeysRequest(include_revoked=include_revoked))
        return [self._row(info) for info in listing.keys]

    def revoke(self, key_id: str) -> dict:
        from loyalty.v1 import security_pb2
        return self._row(self._call("RevokeKey", security_pb2.KeyRef(id=key_id)))

    def rotate(self, key_id: str, grace: float) -> tuple[dict, str]:
        from loyalty.v1 import security_pb2
        made = self._call("RotateKey", security_pb2.RotateKeyRequest(id=key_id, grace_seconds=grace))
        return self._row(made.key), made.secret


def _keys_backend(server, database_url, redis_url):
    return _OnServer(server) if server else _OnDatabase(database_url, redis_url)


def _where(fn):
    """``--server`` (with the credential options) or ``--database-url`` / ``--data-dir``, and ``--redis-url``."""
    fn = click.option("--server", envvar="LOYALTY_KEYS_SERVER", metavar="HOST:PORT", callback=check_server,
                      help="Through this server's Keys RPCs (an admin credential) instead of on the database "
                           "[env LOYALTY_KEYS_SERVER].")(client_options(fn))
    return database_url_option(_redis_option(fn))


def _redis_option(fn):
    return click.option("--redis-url", envvar="LOYALTY_REDIS_URL", metavar="URL",
                        help="Tell the servers through Redis at once (they also poll: within a second).")(fn)


def _show_secret(row: dict, secret: str | None, as_json: bool) -> None:
    if as_json:
        emit_json({**row, "key": secret})
        return
    click.echo(f"{row['kind']} {row['id']} {row['name']!r}: scopes {', '.join(row['scopes'])}"
               + (f", stores {', '.join(row['stores'])}" if row["stores"] else ""))
    if secret:
        click.echo(f"key (shown once, store it now): {secret}")


def register(group: click.Group) -> None:
    @group.group(name="keys")
    def keys_group():
        """API keys and registered client certificates (on the database: also how the first admin key is
        made)."""

    @keys_group.command(name="create")
    @click.option("--name", required=True, help="Who uses it (a terminal, an integration); the audit log's actor.")
    @click.option("--scope", "scopes", multiple=True, required=True,
                  type=click.Choice(["pos", "integration", "admin", "read"]), help="Repeatable.")
    @click.option("--store", "stores", multiple=True, metavar="ID", help="pos only: the stores it serves; "
                  "repeatable [default: every store].")
    @click.option("--certificate", is_flag=True,
                  help="Register a client certificate instead: --name is its subject (e.g. CN=till-7,O=Shop).")
    @_where
    @json_option
    def keys_create(name, scopes, stores, certificate, server, database_url, redis_url, as_json):
        """Create a key and print it once (only its hash is stored)."""
        row, secret = _keys_backend(server, database_url, redis_url).create(
            name=name, scopes=list(scopes), stores=list(stores), kind="certificate" if certificate else "key")
        _show_secret(row, secret, as_json)

    @keys_group.command(name="list")
    @click.option("--all", "include_revoked", is_flag=True, help="Revoked ones too.")
    @_where
    @json_option
    def keys_list(include_revoked, server, database_url, redis_url, as_json):
        """Keys and certificates (never their secrets)."""
        rows = _keys_backend(server, database_url, redis_url).list(include_revoked)
        if as_json:
            emit_json(rows)
            return
        emit_table([{**r, "scopes": ",".join(r["scopes"]), "stores": ",".join(r["stores"])} for r in rows],
                   ["id", "kind", "name", "scopes", "stores", "expires_at"] + (["revoked_at"] if include_revoked else []))

    @keys_group.command(name="revoke")
    @click.argument("key_id", metavar="ID")
    @_where
    @json_option
    def keys_revoke(key_id, server, database_url, redis_url, as_json):
        """Revoke a key or certificate: every server refuses it within a second."""
        row = _keys_backend(server, database_url, redis_url).revoke(key_id)
        if as_json:
            emit_json(row)
        else:
            click.echo(f"revoked {row['kind']} {row['id']} {row['name']!r}")

    @keys_group.command(name="rotate")
    @click.argument("key_id", metavar="ID")
    @click.option("--grace", type=click.FloatRange(min=0, max=30 * 86_400), default=86_400.0, show_default=True,
                  help="Seconds the old key stays valid.")
    @_where
    @json_option
    def keys_rotate(key_id, grace, server, database_url, redis_url, as_json):
        """A new key with the same name, scopes and stores; the old one works --grace seconds more."""
        row, secret = _keys_backend(server, database_url, redis_url).rotate(key_id, grace)
        _show_secret(row, secret, as_json)
        if not as_json:
            click.echo(f"the old key {key_id} stays valid for {grace:g} s")
