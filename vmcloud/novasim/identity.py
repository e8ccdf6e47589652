"""The simulated Keystone v3: version discovery, token issue (password, token, application
credential), validation and revocation, with the catalog keystoneauth needs to find Nova.

Tokens live on the simulator's clock; revoking them makes the next Nova call answer 401, which is
how a test proves that keystoneauth re-authenticates once and carries on.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping

import attrs
from twisted.logger import Logger

from vmcloud.novasim.exchange import Reply, SimRequest
from vmcloud.novasim.views import Calendar

log = Logger()


@attrs.frozen
class Identity:
    """The one user, project and region the simulated cloud knows."""

    username: str = "demo"
    password: str = attrs.field(default="secret", repr=False)
    project_name: str = "demo"
    project_id: str = "6f70656e737461636b20342065766572"
    user_id: str = "d2b7d1d4c6f0482c8bd3c5b1c0a9e7f1"
    domain: str = "Default"
    region: str = "RegionOne"
    application_credential_id: str = "vmcloud-sim-appcred"
    application_credential_secret: str = attrs.field(default="appcred-secret", repr=False)
    static_token: str | None = attrs.field(default=None, repr=False)  # always valid, for token_endpoint
    token_ttl: float = 3600.0


@attrs.frozen
class Token:
    id: str
    expires: float
    issued: float
    methods: tuple[str, ...]


class TokenStore:
    """Issued tokens by id; a token is valid until it expires or :meth:`revoke_all`."""

    def __init__(self, identity: Identity, cal: Calendar) -> None:
        self.identity = identity
        self.cal = cal
        self._tokens: dict[str, Token] = {}
        self.issued = 0

    def issue(self, methods: tuple[str, ...]) -> Token:
        now = self.cal.now()
        self._drop_expired(now)
        token = Token("gAAAAA" + secrets.token_urlsafe(48), now + self.identity.token_ttl, now, methods)
        self._tokens[token.id] = token
        self.issued += 1
        return token

    def valid(self, token_id: str | None) -> bool:
        if token_id is None:
            return False
        if self.identity.static_token is not None and same_secret(token_id, self.identity.static_token):
            return True
        token = self._tokens.get(token_id)
        return token is not None and token.expires > self.cal.now()

    def revoke_all(self) -> int:
        """Forget every issued token (the static one stays valid); returns how many were revoked."""
        count = len(self._tokens)
        self._tokens.clear()
        return count

    def _drop_expired(self, now: float) -> None:
        if len(self._tokens) > 1000:
            self._tokens = {k: t for k, t in self._tokens.items() if t.expires > now}


def same_secret(given: str, expected: str) -> bool:
    """Constant-time comparison that also copes with non-ASCII input."""
    return secrets.compare_digest(
        given.encode("utf-8", "surrogateescape"), expected.encode("utf-8", "surrogateescape")
    )


def keystone_error(status: int, title: str, message: str) -> Reply:
    return Reply(status, {"error": {"code": status, "title": title, "message": message}})


def unauthorized(base_url: str) -> Reply:
    """keystonemiddleware's answer to a missing or bad ``X-Auth-Token`` on a service endpoint."""
    return Reply(
        401,
        {
            "error": {
                "code": 401,
                "title": "Unauthorized",
                "message": "The request you have made requires authentication.",
            }
        },
        headers={"WWW-Authenticate": f'Keystone uri="{base_url}/identity"'},
    )


class IdentityApi:
    """``/identity``: just what keystoneauth's v3 plugins use."""

    def __init__(self, tokens: TokenStore) -> None:
        self.tokens = tokens

    @property
    def identity(self) -> Identity:
        return self.tokens.identity

    def handle(self, request: SimRequest) -> Reply:
        path = request.path.rstrip("/")
        if request.method == "GET" and path == "/identity":
            return Reply(300, {"versions": {"values": [self._version(request.base_url)]}})
        if request.method == "GET" and path == "/identity/v3":
            return Reply(200, {"version": self._version(request.base_url)})
        if path == "/identity/v3/auth/tokens":
            if request.method == "POST":
                return self._authenticate(request)
            return keystone_error(
                405, "Method Not Allowed", "The method is not allowed for the requested URL."
            )
        return keystone_error(404, "Not Found", "The resource could not be found.")

    def _version(self, base_url: str) -> dict[str, object]:
        return {
            "id": "v3.14",
            "status": "stable",
            "updated": "2020-04-07T00:00:00Z",
            "links": [{"rel": "self", "href": f"{base_url}/identity/v3/"}],
            "media-types": [
                {"base": "application/json", "type": "application/vnd.openstack.identity-v3+json"}
            ],
        }

    def _authenticate(self, request: SimRequest) -> Reply:
        try:
            body = request.json()
            auth = body["auth"]  # type: ignore[index]
            identity_part = auth["identity"]
            methods = tuple(identity_part["methods"])
        except (ValueError, KeyError, TypeError):
            return keystone_error(400, "Bad Request", "Expecting to find auth in request body.")
        if not methods or not all(isinstance(m, str) for m in methods):
            return keystone_error(400, "Bad Request", "Expecting to find methods in identity.")
        method = methods[0]
        try:
            ok = self._check(method, identity_part.get(method), request)
        except (KeyError, TypeError, AttributeError):
            return keystone_error(400, "Bad Request", f"Malformed {method} authentication data.")
        if not ok:
            log.info("novasim: authentication refused (method {method})", method=method)
            return keystone_error(401, "Unauthorized", "The request you have made requires authentication.")
        scope = auth.get("scope") if isinstance(auth, Mapping) else None
        scoped = method == "application_credential" or self._scope_matches(scope)
        if scope is not None and not scoped:
            return keystone_error(401, "Unauthorized", "The request you have made requires authentication.")
        token = self.tokens.issue(methods)
        return Reply(
            201,
            {"token": self._token_body(token, request.base_url, scoped)},
            headers={"X-Subject-Token": token.id},
        )

    def _check(self, method: str, data: object, request: SimRequest) -> bool:
        ident = self.identity
        if not isinstance(data, Mapping):
            raise TypeError(method)
        if method == "password":
            user = data["user"]
            name_ok = user.get("name") == ident.username or user.get("id") == ident.user_id
            return bool(name_ok) and same_secret(str(user.get("password", "")), ident.password)
        if method == "token":
            return self.tokens.valid(str(data.get("id") or request.header("x-auth-token") or ""))
        if method == "application_credential":
            return data.get("id") == ident.application_credential_id and same_secret(
                str(data.get("secret", "")), ident.application_credential_secret
            )
        return False

    def _scope_matches(self, scope: object) -> bool:
        if not isinstance(scope, Mapping):
            return False
        project = scope.get("project")
        if not isinstance(project, Mapping):
            return False
        return (
            project.get("name") == self.identity.project_name or project.get("id") == self.identity.project_id
        )

    def _token_body(self, token: Token, base_url: str, scoped: bool) -> dict[str, object]:
        ident = self.identity
        cal = self.tokens.cal
        domain = {"id": "default", "name": ident.domain}
        body: dict[str, object] = {
            "methods": list(token.methods),
            "user": {
                "id": ident.user_id,
                "name": ident.username,
                "domain": domain,
                "password_expires_at": None,
            },
            "audit_ids": [secrets.token_urlsafe(16)],
            "expires_at": cal.keystone(token.expires),
            "issued_at": cal.keystone(token.issued),
        }
        if scoped:
            body["project"] = {"id": ident.project_id, "name": ident.project_name, "domain": domain}
            body["is_domain"] = False
            body["roles"] = [{"id": "5a3f0a6d2a9b4d8f9a4d1f0c3b2e1d0a", "name": "member"}]
            body["catalog"] = [
                self._service("compute", "nova", f"{base_url}/v2.1"),
                self._service("image", "glance", f"{base_url}/image"),
                self._service("identity", "keystone", f"{base_url}/identity"),
            ]
        return body

    def _service(self, kind: str, name: str, url: str) -> dict[str, object]:
        region = self.identity.region
        return {
            "type": kind,
            "name": name,
            "id": secrets.token_hex(16),
            "endpoints": [
                {
                    "id": secrets.token_hex(16),
                    "interface": iface,
                    "region_id": region,
                    "region": region,
                    "url": url,
                }
                for iface in ("public", "internal", "admin")
            ],
        }
