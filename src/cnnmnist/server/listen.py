"""Listening: the address checked and bound at once (a busy port fails here), Uvicorn with a
deadline for every request's head, and a stop at SIGINT or SIGTERM that always ends the same
way (exit 0), whenever it comes."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import resource
import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass

import orjson
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from cnnmnist.errors import CnnmnistError, UsageError
from cnnmnist.server.app import Settings, application, log
from cnnmnist.server.servables import Servables

BACKLOG = 2048  # connections the kernel holds before the server accepts them (Uvicorn's)
# A connection must send a whole request line and headers this soon after it opens (or after
# its last answer): Uvicorn waits for ever, so idle or trickling connections piled up until
# no file descriptor was left for real clients.
HEAD_TIMEOUT = 10.0
IDLE_TIMEOUT = 5.0  # seconds a kept-alive connection may wait for its next request
MAX_CONNECTIONS = 1000  # beyond this many at once, new requests are answered 503
FILES_OF_OUR_OWN = 64  # open files the process needs besides its connections
# SIGINT (Ctrl-C) and SIGTERM (docker stop, systemd) stop the server, exit 0.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
GRACE = 2.0  # seconds that requests still running get to finish once a stop is asked
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]"})


@dataclass(frozen=True)
class Address:
    """Where to listen, as the user gave it and as resolved."""

    given: str
    family: int
    ip: str  # numeric

    @property
    def everywhere(self) -> bool:
        """Whether it is every interface (0.0.0.0 or ::): other machines reach the server."""
        return ipaddress.ip_address(self.ip).is_unspecified

    def url(self, port: int) -> str:
        """A URL a browser on this machine opens."""
        ip = ipaddress.ip_address(self.ip)
        shown = "127.0.0.1" if self.everywhere else self.ip
        shown = f"[{shown}]" if ip.version == 6 and not self.everywhere else shown
        return f"http://{shown}:{port}"

    def names(self) -> frozenset[str]:
        """The Host names a request to this address may give by default."""
        ip = f"[{self.ip}]" if ":" in self.ip else self.ip
        given = f"[{self.given}]" if ":" in self.given else self.given
        return LOOPBACK_NAMES | {ip, given.lower()}


def resolve(host: str) -> Address:
    """The address to listen on; an empty or unknown host is a usage error."""
    if not host.strip():
        raise UsageError("--host: give an address to listen on, such as 127.0.0.1 or 0.0.0.0")
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(
            host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, UnicodeError) as e:
        raise UsageError(f"--host {host[:100]!r}: not an address of this machine ({e})") from None
    return Address(host, family, sockaddr[0])


class _Protocol(HttpToolsProtocol):
    """Uvicorn's HTTP protocol with a deadline for each request's head, room kept for new
    clients, and its answer to a request it cannot parse in JSON, as every other error is."""

    room = MAX_CONNECTIONS  # connections at once; Server sets it from the open-files limit
    _head_deadline = None
    _waiting_since: float | None = None  # when it began waiting for a request's head

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._await_head()
        if len(self.connections) > self.room:
            # Full: the connection that has waited longest without sending a request goes,
            # so that idle connections cannot lock real clients out.
            idle = [c for c in self.connections if getattr(c, "_waiting_since", None) is not None]
            if idle:
                min(idle, key=lambda c: c._waiting_since).transport.close()

    def _await_head(self) -> None:
        self._waiting_since = self.loop.time()
        self._head_deadline = self.loop.call_later(HEAD_TIMEOUT, self._head_timed_out)

    def _head_timed_out(self) -> None:
        if not self.transport.is_closing():
            self.transport.close()

    def on_headers_complete(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
        self._waiting_since = None
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._await_head()

    def connection_lost(self, exc) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        body = orjson.dumps({"error": "malformed HTTP request"})
        head = (
            b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n"
        )
        self.transport.write(head + body)
        self.transport.close()


class Server:
    """The HTTP server (Uvicorn) on a socket bound at once, so a busy port fails here."""

    def __init__(self, servables: Servables, app, address: Address, port: int) -> None:
        self.socket = socket.socket(address.family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind((address.ip, port))
        except OSError as e:
            self.socket.close()
            where = f"{address.given}:{port}"
            if e.errno == errno.EADDRINUSE:
                raise CnnmnistError(
                    f"{where} is already in use (another server?); choose another --port"
                ) from None
            raise CnnmnistError(f"cannot listen on {where}: {e.strerror or e}") from None
        self.socket.listen(BACKLOG)  # from now on connections wait for the loop, not fail
        self.port = self.socket.getsockname()[1]
        self.servables = servables
        # Room for connections within the open-files limit, beside the model's own files.
        _Protocol.room = min(MAX_CONNECTIONS, _more_open_files() - FILES_OF_OUR_OWN)
        config = uvicorn.Config(
            app,
            http=_Protocol,
            loop="uvloop" if _has("uvloop") else "asyncio",
            log_level="error",
            access_log=False,
            server_header=False,
            backlog=BACKLOG,
            timeout_keep_alive=IDLE_TIMEOUT,
            timeout_graceful_shutdown=GRACE,
            limit_concurrency=MAX_CONNECTIONS,
        )
        self._server = _quiet_about_signals(uvicorn.Server)(config)

    def run(self, announce: Callable[[], None] = lambda: None) -> None:
        """Call `announce` (say where the server listens), then serve until SIGINT or SIGTERM
        (or close() from another thread), and release the socket and the model's thread.

        The stop signals are caught before `announce`, so a stop asked at any moment after
        it ends the same way: the signal only raises a flag, which Uvicorn reads before it
        starts serving and every tenth of a second after. Nothing is raised into whatever
        the main thread was doing (a KeyboardInterrupt in the event loop's start-up could
        leave it hung, or end the process with another status). A second signal skips the
        wait for requests still running.
        """
        main = threading.current_thread() is threading.main_thread()
        previous = {s: signal.signal(s, self._stop) for s in STOP_SIGNALS} if main else {}
        try:
            announce()
            self._server.run(sockets=[self.socket])
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self.socket.close()
            self.servables.close()

    def _stop(self, signum: int, frame) -> None:
        if self._server.should_exit:
            self._server.force_exit = True
        self._server.should_exit = True

    def close(self) -> None:
        self._server.should_exit = True


def _quiet_about_signals(server: type) -> type:
    """Uvicorn's server, minus its own signal handlers (Server.run has caught them already)."""

    class Server(server):
        @contextlib.contextmanager
        def capture_signals(self):
            yield

    return Server


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _more_open_files() -> int:
    """Raise the soft limit on open files to the hard one (each connection takes one, and the
    default soft limit, often 1,024 or lower, is reached long before the machine's); returns
    the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        if hard == resource.RLIM_INFINITY or hard > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft if soft != resource.RLIM_INFINITY else 2**20


@dataclass(frozen=True)
class Options:
    """`serve`'s options beside the checkpoint and the address."""

    name: str = "cnnmnist"
    allow_hosts: tuple[str, ...] = ()  # Host names answered besides the server's own
    allow_origins: tuple[str, ...] = ()  # other sites whose pages may call it
    grpc_port: int | None = None
    metrics_path: str = "/monitoring/prometheus/metrics"
    access_log: bool = False
    poll_seconds: float = 2.0
    health_route: str | None = None  # a cloud platform's routes (AIP_HEALTH_ROUTE, ...)
    predict_route: str | None = None


def open_server(
    ckpt, host: str, port: int, options: Options, warn: Callable[[str], None]
) -> tuple[Server, Address]:
    """The server for `serve`'s options, bound and ready to run: the checkpoint (or base
    folder of versions) loaded; the Host names it answers to (the address's own and
    loopback's, plus `allow_hosts`; any at all when it listens on every interface and none
    were given, or one is '*'); the gRPC API beside it when it has a port."""
    address = resolve(host)
    servables = Servables(ckpt, options.name, warn, log=log)
    hosts: frozenset[str] | None = address.names() | {h.lower() for h in options.allow_hosts}
    if "*" in options.allow_hosts or (address.everywhere and not options.allow_hosts):
        hosts = None
    settings = Settings(
        hosts=hosts,
        origins=frozenset(options.allow_origins),
        metrics_path=options.metrics_path,
        access_log=options.access_log,
        health_route=options.health_route,
        predict_route=options.predict_route,
        poll_seconds=options.poll_seconds,
    )
    services = []
    try:
        if options.grpc_port is not None:
            from cnnmnist.server import grpc_api

            services.append(grpc_api.service(servables, address, options.grpc_port))
        server = Server(servables, application(servables, settings, services), address, port)
    except BaseException:
        servables.close()
        raise
    server.grpc_port = services[0].port if services else None
    return server, address


# Vertex AI's custom-container contract: where to listen and which routes to answer.
PLATFORM = ("AIP_HTTP_PORT", "AIP_HEALTH_ROUTE", "AIP_PREDICT_ROUTE")


def platform(environ) -> dict:
    """What a cloud platform's environment asks of the server (Vertex AI custom containers
    set AIP_HTTP_PORT, AIP_HEALTH_ROUTE and AIP_PREDICT_ROUTE): the port, listening on
    every interface, and the health and predict routes. Empty where none is set."""
    asked: dict = {}
    if environ.get("AIP_HTTP_PORT"):
        raw = environ["AIP_HTTP_PORT"]
        if not raw.isdigit() or not 0 < int(raw) < 65536:
            raise UsageError(f"AIP_HTTP_PORT={raw[:20]!r} is not a port number")
        asked |= {"port": int(raw), "host": "0.0.0.0"}
    for variable, key in (
        ("AIP_HEALTH_ROUTE", "health_route"),
        ("AIP_PREDICT_ROUTE", "predict_route"),
    ):
        route = environ.get(variable)
        if route:
            if not route.startswith("/") or any(c in route for c in "{}?# "):
                raise UsageError(f"{variable}={route[:60]!r} is not a route such as /health")
            asked[key] = route
    return asked
