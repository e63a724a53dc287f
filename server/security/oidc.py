"""OIDC access tokens (single sign-on for people, e.g. Keycloak): who a bearer JWT names and what it may do.

``--oidc-issuer URL --oidc-audience AUD``: the issuer's ``/.well-known/openid-configuration`` names its
``jwks_uri``; the key set is fetched on the first token and again when a token names a ``kid`` not in it (a
rotation), at most once per ``refresh_interval`` seconds so that made-up ``kid``s cannot make us hammer the
issuer. Signatures: RS256 and ES256 only (``alg: none``, HS256 with the public key as secret and the rest are
refused before any key is looked at). Claims: ``iss`` equal to the issuer, ``aud`` (a string or a list)
containing the audience, ``exp`` required, ``nbf`` when present, each with ``LEEWAY`` seconds of clock skew.

Scopes come from roles: Keycloak puts realm roles in ``realm_access.roles`` and a client's in
``resource_access.<client>.roles`` (the client is the audience unless ``client`` is given); ``roles`` maps a
role to scopes (``--oidc-role loyalty-admin=admin``). The principal's name is the token's ``sub`` (what the
audit log records), its kind ``token``.

The signature check is joserfc's (a maintained JOSE library by the author of Authlib, typed, with explicit
algorithm allow-lists); a verified token is cached until it expires, so a client repeating its token costs a
dict lookup.
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import threading
import time
import urllib.request

from loyalty.server.errors import PermissionDenied, Unauthenticated
from loyalty.server.security import Principal

from .keys import principal_scopes

__all__ = ["OidcVerifier", "ALGORITHMS", "LEEWAY", "is_jwt"]

log = logging.getLogger("loyalty.server.security.oidc")

ALGORITHMS = ("RS256", "ES256")
LEEWAY = 60                    # seconds of clock skew allowed on exp / nbf
FETCH_TIMEOUT = 5.0
CACHE_LIMIT = 10_000


def is_jwt(value: str) -> bool:
    """A compact JWS: three base64url parts separated by dots (an API key has none)."""
    return value.count(".") == 2


def _b64json(part: str) -> dict:
    try:
        return _json_object(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    except binascii.Error:
        raise Unauthenticated("authorization: not a well-formed JWT") from None


def _json_object(raw: bytes) -> dict:
    try:
        value = json.loads(raw)
    except ValueError:
        raise Unauthenticated("authorization: not a well-formed JWT") from None
    if not isinstance(value, dict):
        raise Unauthenticated("authorization: not a well-formed JWT")
    return value


class OidcVerifier:
    def __init__(self, issuer: str, audience: str, roles: dict[str, list[str]], *, client: str | None = None,
                 refresh_interval: float = 30.0, clock=time.time):
        self.issuer = issuer.rstrip("/")
        self.audience = audience
        self.client = client or audience
        self.roles = roles
        self.refresh_interval = refresh_interval
        self.clock = clock
        self._keys = None              # a joserfc KeySet once fetched
        self._fetched_at = float("-inf")
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[Principal, float]] = {}

    # -- the check

    def cached(self, token: str) -> Principal | None:
        """A token verified before and not yet expired (memory only: the event loop may call this)."""
        hit = self._cache.get(token)
        if hit is not None and self.clock() < hit[1] + LEEWAY:
            return hit[0]
        return None

    def verify(self, token: str) -> Principal:
        """Verify signature and claims (may fetch the key set: call it off the event loop)."""
        from joserfc import jws
        from joserfc.errors import JoseError

        parts = token.split(".")
        if len(parts) != 3:
            raise Unauthenticated("authorization: not a well-formed JWT")
        header = _b64json(parts[0])
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            raise Unauthenticated(f"authorization: token algorithm {alg!r} is not accepted "
                                  f"(expected {' or '.join(ALGORITHMS)})")
        key = self._key(str(header.get("kid", "")))
        try:
            payload = jws.deserialize_compact(token, key, algorithms=[alg]).payload
        except JoseError:
            raise Unauthenticated("authorization: the token's signature does not verify") from None
        claims = _json_object(payload)
        expires = self._check_claims(claims)
        principal = self._principal(claims)
        if len(self._cache) >= CACHE_LIMIT:
            self._cache.clear()
        self._cache[token] = (principal, expires)
        return principal

    def _check_claims(self, claims: dict) -> float:
        now = self.clock()
        if claims.get("iss") != self.issuer:
            raise Unauthenticated(f"authorization: token issuer {claims.get('iss')!r} is not {self.issuer!r}")
        aud = claims.get("aud")
        audiences = aud if isinstance(aud, list) else [aud]
        if self.audience not in audiences:
            raise Unauthenticated(f"authorization: token audience {aud!r} does not include {self.audience!r}")
        exp = claims.get("exp")
        if not isinstance(exp, (int, float)):
            raise Unauthenticated("authorization: token has no exp")
        if now > exp + LEEWAY:
            raise Unauthenticated("authorization: token expired")
        nbf = claims.get("nbf")
        if isinstance(nbf, (int, float)) and now < nbf - LEEWAY:
            raise Unauthenticated("authorization: token not yet valid (nbf)")
        return float(exp)

    def _principal(self, claims: dict) -> Principal:
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise Unauthenticated("authorization: token has no sub")
        roles = list((claims.get("realm_access") or {}).get("roles") or ())
        roles += list(((claims.get("resource_access") or {}).get(self.client) or {}).get("roles") or ())
        scopes = {scope for role in roles if isinstance(role, str) for scope in self.roles.get(role, ())}
        if not scopes:
            raise PermissionDenied(f"token of {subject!r} carries no role mapped to a scope")
        return Principal(subject, "token", principal_scopes(scopes))

    # -- the issuer's keys

    def _key(self, kid: str):
        keys = self._keys
        if keys is None or not _has(keys, kid):
            keys = self._refresh_keys(kid)
        if not _has(keys, kid):
            raise Unauthenticated(f"authorization: token signed with unknown key kid={kid!r}")
        return keys.get_by_kid(kid)

    def _refresh_keys(self, kid: str):
        """Fetch the key set, unless another thread just did or the last fetch is too recent."""
        with self._lock:
            if self._keys is not None and (_has(self._keys, kid) or
                                           self.clock() - self._fetched_at < self.refresh_interval):
                return self._keys
            from joserfc.jwk import KeySet
            try:
                discovery = _get_json(f"{self.issuer}/.well-known/openid-configuration")
                if discovery.get("issuer", "").rstrip("/") != self.issuer:
                    raise ValueError(f"discovery names issuer {discovery.get('issuer')!r}")
                self._keys = KeySet.import_key_set(_get_json(discovery["jwks_uri"]))
            except Exception as exc:  # noqa: BLE001 - the issuer away or wrong: refuse, say so in the log
                log.warning("cannot fetch the OIDC keys of %s: %s", self.issuer, exc)
                if self._keys is None:
                    from loyalty.server.errors import Unavailable
                    raise Unavailable("cannot reach the OIDC issuer to verify the token") from None
            finally:
                self._fetched_at = self.clock()
            return self._keys


def _has(keys, kid: str) -> bool:
    from joserfc.errors import JoseError
    try:
        keys.get_by_kid(kid)
    except (JoseError, ValueError):
        return False
    return True


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT) as response:   # noqa: S310 - configured https URL
        return json.loads(response.read())
