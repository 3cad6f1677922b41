"""What every HTTP request passes before a route sees it (pure ASGI: streams pass through untouched).

In order: the Host header (on a loopback connection, only this machine's names, so a web page cannot reach the
server through DNS rebinding), the Origin (a browser page from another site is refused unless allowed), the API
key (every route but /health, /metrics and /metrics/steps, matched after the root path or mount prefix is
stripped), a JSON Content-Type on request bodies (a page cannot send `text/plain` JSON without a CORS preflight), the
declared body size, and the number of requests in flight, counted before any body is read: a full server answers
429 at once.
"""
from __future__ import annotations

import hmac
import ipaddress
from urllib.parse import urlsplit

from pernode.serve.server.errors import APIError
from pernode.serve.server.options import ServerSettings

PUBLIC_ROUTES = ("/health", "/metrics", "/metrics/steps")  # no API key, never refused for load: probes and scrapers need them
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
_BODY_METHODS = (b"POST", b"PUT", b"PATCH")
RETRY_AFTER_S = 1


def too_large(max_bytes: int) -> APIError:
    return APIError(413, f"the request body is larger than {max_bytes} bytes, the most this server takes "
                         f"(max_body_bytes={max_bytes})", code="request_too_large")


def route_path(scope) -> str:
    """The path the app routes on: `scope["path"]` less the root path (`--root-path`, a mount, a proxy prefix)."""
    path, root = scope["path"], scope.get("root_path") or ""
    if root and (path == root or path.startswith(root.rstrip("/") + "/")):
        path = path[len(root.rstrip("/")):] or "/"
    return path


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _split_host(host: str) -> tuple[str, str | None]:
    """'localhost:8000' -> ('localhost', '8000'); '[::1]:8000' -> ('[::1]', '8000'); 'example' -> ('example', None)"""
    name, sep, port = host.rpartition(":")
    if not sep or name.endswith(":") or (host.startswith("[") and not name.endswith("]")):
        return host, None
    return name, port


class Guard:
    def __init__(self, app, settings: ServerSettings):
        self.app = app
        self.settings = settings
        self.api_key = settings.api_key.encode() if settings.api_key else None
        self.in_flight = 0  # touched on the event loop only

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.lower(): v for k, v in scope["headers"]}
        path = route_path(scope)
        method = scope["method"].encode() if isinstance(scope["method"], str) else scope["method"]
        preflight = method == b"OPTIONS" and b"access-control-request-method" in headers
        error = self._check_host(scope, headers) or self._check_origin(headers)
        if error is None and not preflight:
            error = self._check_key(path, headers) or self._check_body(method, headers)
        if error is not None:
            return await error.response()(scope, receive, send)
        if path in PUBLIC_ROUTES or preflight:
            return await self.app(scope, receive, send)
        limit = self.settings.max_concurrent_requests
        if self.in_flight >= limit:
            error = APIError(429, f"{self.in_flight} requests are in flight, the most this server takes at once "
                                  f"(max_concurrent_requests={limit}); retry later", code="too_many_requests",
                             headers={"Retry-After": str(RETRY_AFTER_S)})
            return await error.response()(scope, receive, send)
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1

    def _check_host(self, scope, headers) -> APIError | None:
        """On a loopback connection, Host must name this machine (with this port) or be in allowed_hosts."""
        server = scope.get("server")
        allowed = self.settings.allowed_hosts
        if not server or not _is_loopback(str(server[0])) or "*" in allowed:
            return None
        raw = headers.get(b"host")
        if raw is None:  # HTTP/1.0 without Host: no browser sends that
            return None
        host = raw.decode("latin-1").strip().lower()
        name, port = _split_host(host)
        here = str(server[1])
        if name in LOOPBACK_NAMES and (port == here or (port is None and here == "80")):
            return None
        for entry in (a.lower() for a in allowed):
            if host == entry or (_split_host(entry)[1] is None and name == entry):
                return None
        return APIError(403, f"host {host!r} is not allowed: a server on loopback answers only localhost, "
                             f"127.0.0.1 or [::1] with its port {here} (add names with allowed_hosts)",
                        code="host_not_allowed")

    def _check_origin(self, headers) -> APIError | None:
        """A browser's Origin must be this server's own (same host) or in allowed_origins."""
        raw = headers.get(b"origin")
        allowed = self.settings.allowed_origins
        if raw is None or "*" in allowed:
            return None
        origin = raw.decode("latin-1").strip()
        if origin in allowed:
            return None
        host = headers.get(b"host", b"").decode("latin-1").strip().lower()
        if origin != "null" and host and urlsplit(origin.lower()).netloc == host:
            return None
        return APIError(403, f"origin {origin!r} is not allowed: requests from other sites' web pages are refused "
                             f"(add origins with allowed_origins)", code="origin_not_allowed")

    def _check_key(self, path: str, headers) -> APIError | None:
        if self.api_key is None or path in PUBLIC_ROUTES:
            return None
        scheme, _, key = headers.get(b"authorization", b"").partition(b" ")
        # compare_digest: the time taken does not tell how much of a guessed key was right
        if scheme.lower() == b"bearer" and hmac.compare_digest(key.strip(), self.api_key):
            return None
        return APIError(401, "missing or invalid API key: send the header 'Authorization: Bearer <key>' with the "
                             "key the server was started with", code="invalid_api_key",
                        headers={"WWW-Authenticate": "Bearer"})

    def _check_body(self, method: bytes, headers) -> APIError | None:
        if method not in _BODY_METHODS:
            return None
        content_type = headers.get(b"content-type", b"").decode("latin-1")
        media = content_type.split(";", 1)[0].strip().lower()
        if media != "application/json":
            return APIError(415, f"Content-Type {content_type or '(none)'!r} is not supported: send the body as JSON "
                                 f"with 'Content-Type: application/json'", code="unsupported_media_type")
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.settings.max_body_bytes:
            return too_large(self.settings.max_body_bytes)
        return None
