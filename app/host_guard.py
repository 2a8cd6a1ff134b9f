"""The app answers only its own names: an ASGI middleware that refuses HTTP requests and websocket upgrades whose
Host, or Origin when one is sent, is not in `Settings.trusted_hosts` (DNS rebinding: docs/host_names.md).

Why: a web page under any name (say `attacker.example`) can make that name resolve to 127.0.0.1 after it has loaded
(DNS rebinding). The browser then treats the app as same-origin with the page: the page opens the app's websocket
and drives every page, Label page included. Streamlit 1.67 checks the Host only with `server.allowedHosts`, only on
the websocket, and only from a static config; the middleware covers every request, from the first one, with the
names from the environment (`YOLODEX_HOST`, `YOLODEX_ALLOWED_HOSTS`). `app/main.py` hands it to `st.App`, which
`streamlit run app/main.py` (and so `make run` and docker/start.sh) serves. docs/host_names.md has the details.

Stdlib only, no Streamlit import: it sees the raw ASGI scope.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any
from urllib.parse import urlsplit

logger = logging.getLogger("yolodex.host_guard")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# WebSocket close code "policy violation": a close before the handshake's accept is answered 403 by uvicorn.
POLICY_VIOLATION = 1008


def host_name(value: str | None, *, origin: bool = False) -> str | None:
    """The lower-case host name in a Host header (`name[:port]`) or an Origin (`scheme://name[:port]`); IPv6
    without brackets. None when the value is missing, malformed (a bad port, user info, a path) or "null"."""
    if not value:
        return None
    if origin:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or parts.path not in ("", "/") or parts.query or parts.fragment:
            return None
    else:
        parts = urlsplit(f"//{value}")
        if parts.path or parts.query or parts.fragment:
            return None
    try:
        parts.port  # noqa: B018 (raises ValueError on a port that is not a number in range)
    except ValueError:
        return None
    if parts.username is not None or parts.password is not None or not parts.hostname:
        return None
    return parts.hostname.lower().rstrip(".")


class HostGuard:
    """Refuses a request (HTTP 403, or a websocket closed before it opens: 403 too) whose Host header, or Origin
    header when present, does not name one of `trusted_hosts`; other scopes (lifespan) pass through.

    Args:
        app: the ASGI app to guard.
        trusted_hosts: host names as `Settings.trusted_hosts` gives them (lower case, IPv6 without brackets).
    """

    def __init__(self, app: ASGIApp, trusted_hosts: Iterable[str]) -> None:
        self.app = app
        self.trusted_hosts = frozenset(trusted_hosts)
        self._logged: set[str] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope.get("headers", [])}
        refused = self.refusal(headers.get("host"), headers.get("origin"))
        if refused is None:
            await self.app(scope, receive, send)
            return
        if refused not in self._logged and len(self._logged) < 100:  # once per name; a flood cannot fill the log
            self._logged.add(refused)
            logger.warning("yolodex: refused requests for %s (%s)", refused, self.advice)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": POLICY_VIOLATION})
            return
        body = f"yolodex refuses requests for {refused}: {self.advice}.\n".encode()
        await send(
            {
                "type": "http.response.start",
                "status": 403,
                "headers": [
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    def refusal(self, host: str | None, origin: str | None) -> str | None:
        """What is wrong with the request's Host and Origin ("the Host 'x'"), or None when both are trusted (an
        absent Origin is fine: non-browser clients send none, and a browser sends one on every websocket)."""
        name = host_name(host)
        if name not in self.trusted_hosts:
            return f"the Host {host!r}"
        if origin is not None and host_name(origin, origin=True) not in self.trusted_hosts:
            return f"the Origin {origin!r}"
        return None

    @property
    def advice(self) -> str:
        names = ", ".join(sorted(self.trusted_hosts))
        return (
            f"this app answers only to {names}; to open it under another name, add that name to YOLODEX_ALLOWED_HOSTS"
        )
