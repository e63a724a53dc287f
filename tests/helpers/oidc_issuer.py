"""A local OIDC issuer for the token tests: an ``http.server`` thread on 127.0.0.1 serving the discovery
document and the JWKS, signing tokens with its own RSA and EC keys (joserfc), keys rotated on demand. It
counts JWKS fetches, so a test can see the server's refresh and its rate limit."""
from __future__ import annotations

import http.server
import json
import threading
import time
import uuid

from joserfc import jwt
from joserfc.jwk import ECKey, KeySet, RSAKey

__all__ = ["Issuer"]


class Issuer:
    def __init__(self, audience: str = "loyalty"):
        self.audience = audience
        self.jwks_fetches = 0
        self._signing: dict[str, object] = {}
        self.rsa_kid = self.add_key("RS256")
        self.ec_kid = self.add_key("ES256")
        issuer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                if self.path == "/.well-known/openid-configuration":
                    body = {"issuer": issuer.url, "jwks_uri": f"{issuer.url}/jwks"}
                elif self.path == "/jwks":
                    issuer.jwks_fetches += 1
                    body = issuer.jwks()
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self._http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._http.server_address[1]}"
        threading.Thread(target=self._http.serve_forever, daemon=True).start()

    def add_key(self, alg: str) -> str:
        """A new signing key published in the JWKS; its kid."""
        kid = f"{alg.lower()}-{uuid.uuid4().hex[:8]}"
        key = (RSAKey.generate_key(2048, parameters={"kid": kid, "alg": alg}) if alg == "RS256"
               else ECKey.generate_key("P-256", parameters={"kid": kid, "alg": alg}))
        self._signing[kid] = (alg, key)
        return kid

    def rotate(self) -> str:
        """Replace every key by a new RS256 one (the old ones leave the JWKS); the new kid."""
        self._signing.clear()
        self.rsa_kid = self.add_key("RS256")
        return self.rsa_kid

    def jwks(self) -> dict:
        return KeySet([key for _alg, key in self._signing.values()]).as_dict(private=False)

    def claims(self, subject: str = "alice", roles=("loyalty-admin",), **overrides) -> dict:
        now = int(time.time())
        claims = {"iss": self.url, "aud": self.audience, "sub": subject, "iat": now, "exp": now + 300,
                  "realm_access": {"roles": list(roles)}}
        claims.update(overrides)
        return claims

    def token(self, claims: dict | None = None, *, kid: str | None = None, key=None, alg: str | None = None) -> str:
        """A token signed with ``kid``'s key (default: the RSA one); ``key`` signs instead (a forgery) under
        the header's ``kid``."""
        kid = kid or self.rsa_kid
        signing_alg, signing_key = self._signing.get(kid, ("RS256", None))
        return jwt.encode({"alg": alg or signing_alg, "kid": kid, "typ": "JWT"}, claims or self.claims(),
                          key or signing_key)

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()
