"""The HTTP server under the app: uvicorn with every read bounded in time and size.

uvicorn offers a keep-alive idle bound (``timeout_keep_alive``), a concurrency limit
(``limit_concurrency``: requests past it get 503), the listen ``backlog`` and h11's
``max_incomplete_event_size``, and these are used as they are. It has no bound on how long a
client may take to send its request: a request line and then silence, or ``Content-Length: 100``
with 2 bytes, holds a connection forever. :class:`BoundedH11Protocol` adds that on top of uvicorn's
own h11 protocol class (passed as ``uvicorn.Config(http=...)``) with one timer per connection:

* head: the request line and headers must be complete ``header_timeout_s`` after the connection
  opened or the previous response ended (a deadline: trickling bytes does not extend it), and be
  at most ``max_header_bytes`` long (431), a pipelined request's head too (it is read while the
  previous request is served, so it is measured when that one's response ends);
* body: while a declared body is outstanding, ``body_timeout_s`` without a byte ends the request,
  and so does falling behind ``min_body_bytes_per_s`` on average once ``body_timeout_s`` has passed
  (a byte every few seconds would otherwise hold the connection for as long as the body lasts).

A partial request that times out is answered 408 and the connection closed; an idle connection
is closed silently. h11 reads any ``HTTP/d.d`` as 1.1; versions other than 1.0 and 1.1 get 505.
It relies only on what uvicorn 0.29 to 0.54 share: ``H11Protocol``'s
``connection_made``/``data_received``/``on_response_complete``/``connection_lost`` and its
``conn`` (the h11 connection), ``transport``, ``flow.read_paused`` and ``cycle.response_started``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import ClassVar

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..errors import PrismError, UsageError
from ..runtime.group import is_loopback

log = logging.getLogger(__name__)

# (status, "header_timeout" | "body_timeout" | "body_too_slow" | "header_too_large" | "http_version")
RefusalHook = Callable[[int, str], None]
HTTP_VERSIONS = ("1.0", "1.1")
# after refusing an oversized head, what the client still sends is read and dropped this long before
# the close: closing a socket with unread data resets it, and the client may lose the answer
LINGER_S = 2.0


@dataclass(frozen=True)
class HttpLimits:
    """Bounds on what one client can hold. The defaults suit a board serving a few dozen clients."""

    header_timeout_s: float = 10.0  # request line + headers complete within this, from open / last response
    body_timeout_s: float = 30.0  # longest silence while a request body is outstanding
    min_body_bytes_per_s: float = 16 * 1024  # a body's average rate, counted once body_timeout_s has passed
    keep_alive_s: float = 5.0  # an idle keep-alive connection is closed after this
    max_header_bytes: int = 16 * 1024  # request line + headers
    max_connections: int = 64  # open connections that get served; requests on more get 503
    backlog: int = 128  # connections the kernel queues before accept

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            integral = name in ("max_header_bytes", "max_connections", "backlog")
            bad = (not isinstance(value, int) or isinstance(value, bool) or value < 1) if integral else \
                (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                 or value <= 0)
            if bad:
                kind = "a positive integer" if integral else "a positive finite number of seconds"
                raise UsageError(f"HTTP limit {name} must be {kind}, got {value!r}")


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with head and body read bounds (see the module docstring).
    Subclassed per server by :func:`server_config`, which sets the class attributes."""

    limits: ClassVar[HttpLimits] = HttpLimits()
    on_refusal: ClassVar[RefusalHook | None] = None

    # per-connection state, as class defaults so uvicorn's __init__ (which differs by version) is not touched
    _timer: asyncio.TimerHandle | None = None
    _waiting: str | None = None  # "head" or "body": what the timer bounds
    _head_bytes = 0  # bytes of the awaited head seen so far
    _head_tail = b""  # the last bytes seen, so a head end split across reads is still found
    _body_started = 0.0  # time.monotonic() when the outstanding body began
    _body_bytes = 0  # bytes read since then
    _refused = False  # answered and ending: what the client still sends is dropped

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._watch_reads(progress=False)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._waiting == "head" and not self._head_fits(data):
            return
        if self._waiting == "body" and not self._body_keeps_pace(len(data)):
            return
        super().data_received(data)
        self._watch_reads(progress=True)

    def on_response_complete(self) -> None:
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            pipelined = self.conn.trailing_data[0]  # read while this request was served, parsed next
            end = pipelined.find(b"\r\n\r\n")
            if (len(pipelined) if end < 0 else end + 4) > self.limits.max_header_bytes:
                self._refuse_large_head()
                return
        super().on_response_complete()  # returns at once when the connection is closing
        self._watch_reads(progress=False)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        super().connection_lost(exc)

    # ------------------------------------------------------------------ the timer

    def _head_fits(self, data: bytes) -> bool:
        """Count ``data`` towards the awaited head; refuse with 431 once the head is over the limit.
        h11's own bound only applies while the head is incomplete after a read, so a large head
        arriving in one read would pass it."""
        window = self._head_tail + data
        end = window.find(b"\r\n\r\n")
        head = self._head_bytes + (len(data) if end < 0 else end + 4 - len(self._head_tail))
        if head > self.limits.max_header_bytes:
            self._refuse_large_head()
            return False
        self._head_bytes += len(data)
        self._head_tail = window[-3:]
        return True

    def _refuse_large_head(self) -> None:
        self._refuse("header_too_large", 431, "Request Header Fields Too Large",
                     f"the request line and headers exceed {self.limits.max_header_bytes} bytes", linger=True)

    def _body_keeps_pace(self, received: int) -> bool:
        """Count ``received`` body bytes; refuse with 408 a body whose average rate, once the grace
        of ``body_timeout_s`` is over, is below ``min_body_bytes_per_s``."""
        self._body_bytes += received
        elapsed = time.monotonic() - self._body_started - self.limits.body_timeout_s
        if elapsed <= 0 or self._body_bytes >= elapsed * self.limits.min_body_bytes_per_s or self.flow.read_paused:
            return True
        self._refuse("body_too_slow", 408, "Request Timeout",
                     f"the request body arrives slower than {self.limits.min_body_bytes_per_s:g} bytes/s "
                     f"({self._body_bytes} bytes in {elapsed + self.limits.body_timeout_s:.0f} s); the "
                     f"connection is closed")
        return False

    def _watch_reads(self, progress: bool) -> None:
        """Arm, keep or cancel the read timer for what the connection now waits for from the client."""
        if self._refused:
            return
        if self.transport.is_closing():
            self._cancel()
            return
        state = self.conn.their_state
        if state is h11.IDLE:
            if self._waiting != "head":  # a new request head is awaited from now on: a fixed deadline
                pipelined = self.conn.trailing_data[0]  # the start of a head read with the previous request
                self._head_bytes, self._head_tail = len(pipelined), pipelined[-3:]
                self._arm("head", self.limits.header_timeout_s)
        elif state is h11.SEND_BODY:
            if self._waiting != "body":
                self._body_started, self._body_bytes = time.monotonic(), 0
            if self._waiting != "body" or progress:  # silence is bounded, so every byte restarts it
                self._arm("body", self.limits.body_timeout_s)
        else:  # the request is complete (the server is working) or the connection is ending
            self._cancel()

    def _arm(self, waiting: str, seconds: float) -> None:
        self._cancel()
        self._waiting = waiting
        self._timer = asyncio.get_running_loop().call_later(seconds, self._expired)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._waiting = None, None

    def _expired(self) -> None:
        waiting, self._timer, self._waiting = self._waiting, None, None
        if self.transport.is_closing():
            return
        if waiting == "body":
            if self.flow.read_paused:  # the app has not consumed what came: the server holds the body back
                self._arm("body", self.limits.body_timeout_s)
                return
            if self.cycle is not None and self.cycle.response_started:  # answered early; the rest is unwanted
                self.transport.close()
                return
            self._refuse("body_timeout", 408, "Request Timeout",
                         f"no request body data for {self.limits.body_timeout_s:g} s; the connection is closed")
        elif self._head_bytes:
            self._refuse("header_timeout", 408, "Request Timeout",
                         f"the request line and headers did not arrive within {self.limits.header_timeout_s:g} s")
        else:  # nothing of a next request was sent: an idle connection, closed without a word
            self.transport.close()

    def _refuse(self, reason: str, status: int, phrase: str, message: str, linger: bool = False) -> None:
        """Answer a request the app never saw (or that stalled mid-body) and close the connection,
        after :data:`LINGER_S` of dropping what still comes if ``linger``. Written raw: h11 has no
        state in which it would send a response to a request it did not parse."""
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        log.info("%s: %d %s: %s", client, status, reason, message)
        body = json.dumps({"error": message}).encode()
        head = (f"HTTP/1.1 {status} {phrase}\r\ncontent-type: application/json\r\nconnection: close\r\n"
                f"content-length: {len(body)}\r\n\r\n").encode("latin-1")
        self._cancel()
        self._refused = True
        self.transport.write(head + body)
        if linger and self.transport.can_write_eof():
            self.transport.write_eof()
            self.flow.resume_reading()
            self._timer = asyncio.get_running_loop().call_later(LINGER_S, self.transport.close)
        else:
            self.transport.close()
        hook = type(self).on_refusal
        if hook is not None:
            hook(status, reason)


def known_http_versions_only(app, on_refusal: RefusalHook | None = None):
    """``app`` behind a check of the request's HTTP version: h11 parses any ``HTTP/d.d`` and treats
    it as 1.1, so ``HTTP/9.9`` would be served as if it were 1.1."""

    async def checked(scope, receive, send) -> None:
        version = scope.get("http_version", "1.1")
        if scope["type"] != "http" or version in HTTP_VERSIONS:
            await app(scope, receive, send)
            return
        body = json.dumps({"error": f"HTTP/{version} is not supported; this server speaks HTTP/1.1 "
                                    f"(and 1.0)"}).encode()
        await send({"type": "http.response.start", "status": 505,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
        if on_refusal is not None:
            on_refusal(505, "http_version")

    return checked


def check_exposure(host: str, has_token: bool, allow_unauthenticated: bool) -> None:
    """Refuse to serve a non-loopback address without a token, unless explicitly allowed."""
    if is_loopback(host) or has_token:
        return
    if not allow_unauthenticated:
        raise UsageError(f"refusing to serve on {host} without a bearer token: anyone who can reach it could run "
                         f"inference. Set --token / PRISM_TRT_TOKEN, bind 127.0.0.1, or pass "
                         f"--allow-unauthenticated if the network itself is trusted")
    log.warning("serving on %s without a bearer token (--allow-unauthenticated): anyone who can reach this port "
                "can run inference", host)


def server_config(app, host: str = "127.0.0.1", port: int = 8000, limits: HttpLimits | None = None,
                  log_level: str = "info", on_refusal: RefusalHook | None = None) -> uvicorn.Config:
    """The uvicorn configuration for ``app`` with ``limits`` applied (see the module docstring)."""
    limits = limits or HttpLimits()
    protocol = type("BoundedH11Protocol", (BoundedH11Protocol,),
                    {"limits": limits, "on_refusal": None if on_refusal is None else staticmethod(on_refusal)})
    # uvicorn counts the asking connection itself against limit_concurrency: +1 so that
    # max_connections connections are served and the next one's requests get 503
    return uvicorn.Config(known_http_versions_only(app, on_refusal), host=host, port=port, http=protocol, ws="none",
                          lifespan="on", log_level=log_level,
                          workers=None, proxy_headers=False, server_header=False, timeout_graceful_shutdown=30,
                          limit_concurrency=limits.max_connections + 1, backlog=limits.backlog,
                          timeout_keep_alive=limits.keep_alive_s,  # type: ignore[arg-type]  # a float works
                          h11_max_incomplete_event_size=limits.max_header_bytes)


def serve(app, host: str = "127.0.0.1", port: int = 8000, limits: HttpLimits | None = None,
          allow_unauthenticated: bool = False, log_level: str = "info") -> None:
    """Run ``app`` with bounded reads until interrupted: one process, since the executor lives in it.
    A non-loopback ``host`` needs the app's token, or ``allow_unauthenticated``."""
    server = getattr(app.state, "server", None)
    check_exposure(host, server is not None and server.token is not None, allow_unauthenticated)
    hook = server.count_refusal if server is not None else None
    runner = uvicorn.Server(server_config(app, host, port, limits, log_level, on_refusal=hook))
    runner.run()
    if not runner.started:  # uvicorn logged why (the lifespan failed, say)
        raise PrismError(f"the HTTP server on {host}:{port} did not start; see the log above")
