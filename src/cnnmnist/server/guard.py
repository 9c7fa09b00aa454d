"""Who may call the server: requests naming another host (DNS rebinding) and requests sent by
a web page on another site (a form, a fetch) are refused before any work, unless the user
allowed them. A client that is not a browser sends no Origin and passes."""

from __future__ import annotations

import orjson

ALLOW = "GET, HEAD, POST, OPTIONS"


def _host_name(host: str) -> str:
    """The name in a Host header, without its port ('[::1]:8501' -> '[::1]')."""
    if host.startswith("["):
        return host.partition("]")[0] + "]"
    return host.rpartition(":")[0] if host.count(":") == 1 else host


class Guard:
    """ASGI middleware in front of the application.

    `hosts`: the names a request's Host header may give (None: any, for a server that other
    machines reach by names it cannot know). `origins`: other sites whose pages may call it
    (CORS; `*` for any); the page the server serves itself is always allowed.
    """

    def __init__(self, app, hosts: frozenset[str] | None, origins: frozenset[str]) -> None:
        self.app, self.hosts, self.origins = app, hosts, origins

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get(b"host", "")
        if self.hosts is not None and _host_name(host.lower()) not in self.hosts:
            return await _refuse(
                send,
                403,
                f"this server does not answer to the host name {host[:100]!r}; start it with "
                "--allow-host NAME to allow a name",
            )
        origin = headers.get(b"origin")
        same = origin is not None and origin in (f"http://{host}", f"https://{host}")
        allowed = origin is None or same or origin in self.origins or "*" in self.origins
        if not allowed:
            return await _refuse(
                send,
                403,
                f"requests from web pages at {origin[:100]!r} are refused (another site); "
                "start the server with --allow-origin ORIGIN to allow that site's pages",
            )
        cors = origin is not None and not same
        if scope["method"] == "OPTIONS":  # a preflight, or a client asking what is allowed
            extra = [(b"allow", ALLOW.encode())]
            if cors:
                extra += _cors(origin) + [
                    (b"access-control-allow-methods", ALLOW.encode()),
                    (b"access-control-allow-headers", b"content-type"),
                    (b"access-control-max-age", b"600"),
                ]
            await send({"type": "http.response.start", "status": 204, "headers": extra})
            return await send({"type": "http.response.body", "body": b""})
        if not cors:
            return await self.app(scope, receive, send)

        async def with_cors(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *_cors(origin)]}
            await send(message)

        return await self.app(scope, receive, with_cors)


def _cors(origin: str) -> list[tuple[bytes, bytes]]:
    return [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"origin")]


async def _refuse(send, status: int, message: str) -> None:
    body = orjson.dumps({"error": message})
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
