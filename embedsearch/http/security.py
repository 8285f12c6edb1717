"""What keeps other web sites out of the service, and the server's folders out of its answers.

With no token (the default on loopback) the service trusts whoever can reach it, and a browser
reaches it on behalf of any web page. Two defences, both pure ASGI middleware in :class:`SiteGuard`:

- DNS rebinding: a page on ``attacker.example`` whose name then resolves to 127.0.0.1 talks to the
  service as its own origin, but its requests still carry ``Host: attacker.example``. Only the
  names the service is bound to are answered (any port); others get 421.
- Cross-site writes: a form or ``fetch`` from another site carries ``Origin`` (or
  ``Sec-Fetch-Site: cross-site``). Writes whose origin is not one of the allowed names get 403.
  Requests with neither header (curl, scripts) are not from a browser page and pass.

:func:`public_text` rewrites messages at the edge so that no absolute server path leaves it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

#: Always answered: the service can always be reached by these from the machine itself.
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
#: ``--host`` values that mean every interface: they name no host a client would use.
ANY_INTERFACE = ("0.0.0.0", "::", "")
_WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def host_name(value: str) -> str:
    """A Host header or a host name as compared: lower case, no port, no brackets, no final dot."""
    value = value.strip().lower()
    if value.startswith("["):  # [::1]:8000
        return value[1 : value.find("]")] if "]" in value else value
    if value.count(":") == 1:  # name:port (a bare IPv6 address has several colons)
        value = value.split(":", 1)[0]
    return value.rstrip(".")


def allowed_names(names: Iterable[str]) -> frozenset[str]:
    """The loopback names plus ``names`` (``--host`` unless it means every interface, ``--allow-host``)."""
    given = {host_name(n) for n in names}
    return frozenset(LOOPBACK_NAMES) | {n for n in given if n not in ANY_INTERFACE}


def _refuse(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class SiteGuard:
    """421 for a Host the service is not bound to; 403 for a write sent by another site's page."""

    def __init__(self, app: ASGIApp, allowed: frozenset[str]) -> None:
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        refused = self.check(scope)
        if refused is not None:
            await refused(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def check(self, scope: Scope) -> JSONResponse | None:
        headers = {k.lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get(b"host")
        if host is not None and host_name(host) not in self.allowed:
            shown = re.sub(r"[^\w.:\[\]-]", "?", host)[:100]
            return _refuse(
                421,
                f"this service does not answer to the host name {shown!r}; "
                f"start it with 'embedsearch serve --allow-host {host_name(shown)}' if that name is yours",
            )
        if scope.get("method") not in _WRITES:
            return None
        origin = headers.get(b"origin")
        if headers.get(b"sec-fetch-site") == "cross-site" or (origin is not None and not self.same_site(origin)):
            return _refuse(403, "writes from another web site's page are refused; use the service's own page or API")
        return None

    def same_site(self, origin: str) -> bool:
        parts = urlsplit(origin)
        return parts.scheme in ("http", "https") and host_name(parts.netloc) in self.allowed


class RequestLimit:
    """At most ``limit`` requests in progress at once; another gets a JSON 503 with ``Retry-After``
    at once, before its body is read.

    Each request may hold an upload of up to the body limit, and each open one holds a task, so
    this bounds what many slow or idle clients together can make the service keep (uvicorn's own
    ``limit_concurrency`` answers text, not JSON). The count is of one event loop: no lock.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit
        self.active = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.active >= self.limit:
            message = f"the service is busy with {self.limit} requests already; try again shortly"
            await _refuse(503, message, {"Retry-After": "1"})(scope, receive, send)
            return
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1


# -- no server paths in answers ---------------------------------------------------------------------

_DB_URL = re.compile(r"\b(sqlite|postgres\w*|mysql\w*|mariadb\w*|oracle\w*|mssql\w*)(\+\w+)?://[^\s'\"]*")
#: An absolute POSIX path: a "/" not inside a word or after another "/", up to a space or a quote;
#: the service's own URLs (/api/...) are not paths of the server.
_ABSOLUTE = re.compile(r"(?<![\w/.~:-])/(?!api/)[^\s'\"`,;()]+")


def public_path(path: str, home: Path) -> str:
    """A path as a client may see it: relative to the library home, else only its file name."""
    pure = PurePosixPath(path)
    if not pure.is_absolute():
        return path
    root = PurePosixPath(home.as_posix())
    if pure == root:
        return "the library"
    if pure.is_relative_to(root):
        return str(pure.relative_to(root))
    return pure.name or "a file"


def public_text(message: str, home: Path) -> str:
    """``message`` with database URLs and absolute paths replaced by the library's own terms."""
    message = _DB_URL.sub(lambda m: _public_match(m.group(0), home, _public_url), message)
    return _ABSOLUTE.sub(lambda m: _public_match(m.group(0), home, public_path), message)


def _public_url(url: str, home: Path) -> str:
    """A SQLite URL as its file (relative to the home); any other database's URL (it may hold a
    password) as nothing but its kind."""
    scheme, _, rest = url.partition("://")
    if scheme.startswith("sqlite"):
        return public_path(rest[1:], home) if rest.startswith("/") else "the library's database"
    return f"the {scheme.split('+')[0]} database"


def _public_match(found: str, home: Path, public: Callable[[str, Path], str]) -> str:
    path = found.rstrip(".:")  # the end of the sentence, not of the path
    return public(path, home) + found[len(path) :]
