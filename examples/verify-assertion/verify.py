"""Verify the X-Touchgate-Assertion header that a touchgate gateway adds to each request.

The gateway signs, for every user and service, a short-lived JWT (ES256, five minutes) that
names the user. A service behind the gateway verifies it with the gateway's public keys,
published at https://GATEWAY/.well-known/jwks.json, to learn who is calling from proof rather
than from a plain header:

    verifier = AssertionVerifier(
        jwks_url="https://touchgate-gateway-abc123-ew.a.run.app/.well-known/jwks.json",
        issuer="https://gw.example.com",          # the gateway's origin (https://{rp_id})
        audience="https://api-xyz-uc.a.run.app",  # this service's audience in gateway.toml
    )
    caller = verifier.verify(request.headers["X-Touchgate-Assertion"])
    caller.user      # "alice@example.com"

`verify` raises `AssertionRefused` for anything but a genuine, current assertion for this
service from this gateway. Needs PyJWT 2.6 or newer with its crypto extra (Debian:
python3-jwt, python3-cryptography).

From the command line it reads assertions from standard input, one a line, and prints one JSON
line for each: {"user": ..., "service": ..., "expires_at": ...} or {"refused": "why"}.

    python3 verify.py --jwks URL --issuer ISSUER --audience AUDIENCE < assertions
"""

import argparse
import dataclasses
import json
import sys
import threading
import time
import urllib.parse
import urllib.request

import jwt

# The one algorithm the gateway signs with. Pinned: a token naming any other (HS256 with the
# public key as its secret, "none") is refused before its signature is looked at.
ALGORITHM = "ES256"

# Every claim the gateway puts in an assertion, required.
REQUIRED_CLAIMS = ["iss", "sub", "aud", "iat", "exp"]

# How long the gateway's keys are kept before they are fetched again; the gateway serves them
# with Cache-Control: max-age=300.
KEYS_LIFESPAN_SECONDS = 300

# An assertion naming a key not in the cached set makes the client fetch the set again (the
# gateway may have rotated its key). Not more often than this, so that tokens with made-up key
# ids cannot make every request a fetch from the gateway.
MIN_REFETCH_SECONDS = 10

# How long one fetch of the keys may take.
FETCH_TIMEOUT_SECONDS = 5

# Clock difference allowed between the gateway and this service.
LEEWAY_SECONDS = 30


class AssertionRefused(Exception):
    """The assertion is not a genuine, current one for this service: do not trust the caller."""


@dataclasses.dataclass(frozen=True)
class Caller:
    """Who called, as the gateway vouches."""

    user: str
    """The user the gateway signed in (its `sub`), e.g. an email address."""
    service: str
    """The gateway's name for this service (its `svc`)."""
    expires_at: int
    """When the assertion expires, seconds since the epoch."""


class _GatewayKeys(jwt.PyJWKClient):
    """PyJWKClient with a timeout on each fetch and at most one fetch per MIN_REFETCH_SECONDS."""

    def __init__(self, uri):
        super().__init__(uri, cache_jwk_set=True, lifespan=KEYS_LIFESPAN_SECONDS)
        self._lock = threading.Lock()
        self._last = None
        self._last_at = 0.0

    def fetch_data(self):
        with self._lock:
            now = time.monotonic()
            if self._last is not None and now - self._last_at < MIN_REFETCH_SECONDS:
                return self._last
            request = urllib.request.Request(self.uri, headers={"Accept": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=FETCH_TIMEOUT_SECONDS) as response:
                    data = json.load(response)
            except (OSError, ValueError) as e:
                raise jwt.PyJWKClientError(
                    f"cannot fetch the gateway's keys from {self.uri}: {e}"
                ) from e
            self._last, self._last_at = data, now
            if self.jwk_set_cache is not None:
                self.jwk_set_cache.put(data)
            return data


class AssertionVerifier:
    """Verifies assertions for one service, from one gateway. Make one and keep it: it caches
    the gateway's keys. Safe to share between threads."""

    def __init__(self, jwks_url, issuer, audience, *, dangerous_allow_plain_http=False):
        """`jwks_url`: the gateway's https://GATEWAY/.well-known/jwks.json. `issuer`: the
        gateway's origin, `https://{rp_id}` unless its config sets `origin`. `audience`: this
        service's `audience` in the gateway's config (by default its upstream URL's origin,
        e.g. https://api-xyz-uc.a.run.app). `dangerous_allow_plain_http`: accept an http://
        URL for the keys, which anyone on the way could replace; for tests on loopback only."""
        scheme = urllib.parse.urlsplit(jwks_url).scheme
        if scheme != "https" and not (scheme == "http" and dangerous_allow_plain_http):
            raise ValueError(
                f"the gateway's keys must come over https, not from {jwks_url!r}: anyone on "
                "the way could swap them for their own"
            )
        if not issuer or not audience:
            raise ValueError("give the gateway's issuer and this service's audience")
        self._keys = _GatewayKeys(jwks_url)
        self._issuer = issuer
        self._audience = audience

    def verify(self, assertion):
        """The caller the assertion names; raises AssertionRefused unless it is signed by one
        of the gateway's keys with ES256, for this audience, by this issuer, and not expired."""
        if not assertion:
            raise AssertionRefused("no X-Touchgate-Assertion: the request did not come through the gateway")
        try:
            key = self._keys.get_signing_key_from_jwt(assertion)
            claims = jwt.decode(
                assertion,
                key.key,
                algorithms=[ALGORITHM],
                audience=self._audience,
                issuer=self._issuer,
                leeway=LEEWAY_SECONDS,
                options={"require": REQUIRED_CLAIMS},
            )
        except jwt.PyJWTError as e:
            raise AssertionRefused(str(e)) from e
        user = claims.get("sub")
        if not isinstance(user, str) or not user:
            raise AssertionRefused("the assertion names no user")
        return Caller(user=user, service=str(claims.get("svc", "")), expires_at=int(claims["exp"]))


def main():
    p = argparse.ArgumentParser(description="Verify X-Touchgate-Assertion values read from stdin, one a line.")
    p.add_argument("--jwks", required=True, help="the gateway's https://GATEWAY/.well-known/jwks.json")
    p.add_argument("--issuer", required=True, help="the gateway's origin, https://RP_ID")
    p.add_argument("--audience", required=True, help="this service's audience in the gateway's config")
    p.add_argument(
        "--dangerous-allow-plain-http",
        action="store_true",
        help="fetch the keys over plain http (tests on loopback only)",
    )
    args = p.parse_args()
    try:
        verifier = AssertionVerifier(
            args.jwks, args.issuer, args.audience, dangerous_allow_plain_http=args.dangerous_allow_plain_http
        )
    except ValueError as e:
        print(f"verify.py: {e}", file=sys.stderr)
        return 2
    for line in sys.stdin:
        try:
            caller = verifier.verify(line.strip())
            out = dataclasses.asdict(caller)
        except AssertionRefused as e:
            out = {"refused": str(e)}
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
