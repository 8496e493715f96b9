"""Serving the page: a Bokeh server bound to one address, optionally behind a token.

Bokeh serves its JavaScript from its own wheel (``/static``); nothing is fetched from a CDN.
The server has one application (``/``) and serves no file of any trace: the page only shows
what the :class:`~ntrace.view.runs.Monitor` computed from the traces it was given, so no
request can reach another file. On 127.0.0.1 (the default) only this machine can connect.
Bound anywhere else, every request must carry the random token the URL holds (``?token=``,
then a cookie), compared in constant time; without it the server answers 403.
"""

from __future__ import annotations

import hmac
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from bokeh.application import Application
from bokeh.application.handlers.function import FunctionHandler
from bokeh.server.auth_provider import AuthProvider
from bokeh.server.server import Server
from tornado.web import RequestHandler
from tornado.websocket import WebSocketHandler

from ntrace.view.page import make_document
from ntrace.view.runs import Monitor

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
COOKIE = "ntrace_view_token"


class Refused(RequestHandler):
    """Where a request without the token is sent: 403 and what to do."""

    def get(self) -> None:
        self.set_status(403)
        self.write("ntrace view: open the URL that ntrace view printed; it carries the "
                   "access token\n")


class TokenAuth(AuthProvider):
    """Requests carry ``token`` (query argument, then a cookie the first page sets)."""

    def __init__(self, token: str) -> None:
        self.token = token
        super().__init__()

    @property
    def get_user(self) -> Callable[[Any], str | None]:
        def user(handler: Any) -> str | None:
            given = handler.get_argument("token", None)
            if given is not None and hmac.compare_digest(given.encode(), self.token.encode()):
                if not isinstance(handler, WebSocketHandler):  # the page: remember it
                    handler.set_cookie(COOKIE, self.token, httponly=True, samesite="Strict")
                return "viewer"
            cookie = handler.get_cookie(COOKIE)
            if cookie is not None and hmac.compare_digest(cookie.encode(), self.token.encode()):
                return "viewer"
            return None

        return user

    @property
    def get_user_async(self) -> None:
        return None

    @property
    def login_url(self) -> str:
        return "/login"

    @property
    def get_login_url(self) -> None:
        return None

    @property
    def login_handler(self) -> type[RequestHandler]:
        return Refused

    @property
    def logout_url(self) -> None:
        return None

    @property
    def logout_handler(self) -> None:
        return None


@dataclass
class View:
    """A started server: its URL (token included), the monitor and Bokeh's server."""

    url: str
    monitor: Monitor
    server: Server
    token: str | None

    def run(self) -> None:
        """Serve until interrupted."""
        self.server.io_loop.start()

    def stop(self) -> None:
        self.monitor.stop()
        self.server.stop()


def free_port(host: str) -> int:
    """A port no one listens on at ``host`` now (for ``--port 0``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def start_view(monitor: Monitor, host: str = "127.0.0.1", port: int = 5006) -> View:
    """Start the monitor and a server for its page on ``host:port`` (0: any free port)."""
    local = host in LOCAL_HOSTS
    token = None if local else secrets.token_urlsafe(24)
    kwargs: dict[str, Any] = {"address": host, "num_procs": 1, "port": port,
                              "check_unused_sessions_milliseconds": 5000,
                              "unused_session_lifetime_milliseconds": 15000}
    if token is not None:
        kwargs["auth_provider"] = TokenAuth(token)
    if port == 0:
        kwargs["port"] = port = free_port(host)
    app = Application(FunctionHandler(partial(make_document, monitor)))
    origins = [f"127.0.0.1:{port}", f"localhost:{port}"] if local else ["*"]
    server = Server({"/": app}, allow_websocket_origin=origins, **kwargs)
    bound = server.port
    monitor.start()
    server.start()
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    shown = f"[{shown}]" if ":" in shown else shown
    url = f"http://{shown}:{bound}/" + (f"?token={token}" if token else "")
    return View(url, monitor, server, token)
