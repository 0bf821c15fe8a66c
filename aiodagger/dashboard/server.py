"""The dashboard's HTTP server: aiohttp on the cluster's own loop.

Routes: ``/`` (the page), ``/static/NAME`` (its script and style, shipped in the
package: the page fetches nothing from elsewhere and works offline), ``/ws`` (the live
feed, JSON), ``/api/state`` (the feed's full message, once) and ``/metrics``
(Prometheus). Every request passes :mod:`.guard` first.

Lifecycle: :meth:`Dashboard.start` binds the port, attaches the state to the scheduler
and starts the lag timer and the update ticker; :meth:`Dashboard.stop` undoes all of it
(pages get a close frame, the port is closed, no task is left). Nothing of this runs,
and nothing is attached to the scheduler, when a cluster has no dashboard.
"""

from __future__ import annotations

import asyncio
import json
import logging
from importlib import resources
from typing import TYPE_CHECKING, Any

from aiohttp import WSCloseCode, web

from .feed import Feed
from .guard import Bind
from .metrics import CONTENT_TYPE, make_registry, render
from .state import DashboardState

if TYPE_CHECKING:
    from ..cluster import Cluster

__all__ = ["Dashboard"]

logger = logging.getLogger(__name__)

UPDATE_INTERVAL = 0.25  # seconds: four updates a second at most, whatever the task rate
SEND_TIMEOUT = 10.0  # a page that takes longer to read one update is closed
STATIC = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
# The page loads only its own files and talks only to its own server ('self' covers
# ws:// to the same host and port).
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'")

class _Page:
    """One open websocket, and the send in flight to it (one at a time)."""

    __slots__ = ("behind", "sending", "ws")

    def __init__(self, ws: web.WebSocketResponse) -> None:
        self.ws = ws
        self.sending: asyncio.Task[None] | None = None
        self.behind = False  # it skipped an update: send it a full hello next


class Dashboard:
    """The dashboard of one cluster, served at :attr:`url` once started."""

    def __init__(self, cluster: Cluster, bind: Bind) -> None:
        self._cluster = cluster
        self.bind = bind
        self.state = DashboardState()
        self.feed = Feed(self.state, lambda: cluster.workers, lambda: cluster.tasks_in_flight)
        self.registry = make_registry(self.state, lambda: cluster.workers,
                                      lambda: cluster.tasks_in_flight)
        self._pages: set[_Page] = set()
        self._runner: web.AppRunner | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._files: dict[str, bytes] = {}
        self._tick_failed = False

    @property
    def url(self) -> str:
        """The page's address; with a token, the ``?token=`` that opens it."""
        url = f"http://{self.bind.url_host()}:{self.bind.port}/"
        return url if self.bind.token is None else f"{url}?token={self.bind.token}"

    # -- lifecycle (on the cluster's loop) ----------------------------------------------
    async def start(self) -> None:
        folder = resources.files(__package__).joinpath("static")
        self._files = {name: folder.joinpath(name).read_bytes() for name in ("index.html", *STATIC)}
        app = web.Application(middlewares=[self._guard])
        app.router.add_get("/", self._page)
        app.router.add_get("/static/{name}", self._static)
        app.router.add_get("/ws", self._websocket)
        app.router.add_get("/api/state", self._api_state)
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, self.bind.host, self.bind.port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise OSError(exc.errno, f"{self.bind.option}: cannot listen on {self.bind.host}:"
                          f"{self.bind.port}: {exc.strerror or exc} (choose another port, or "
                          "port 0 for any free one)") from exc
        self._runner = runner
        self.bind = self.bind.with_port(runner.addresses[0][1])
        loop = asyncio.get_running_loop()
        self._cluster._scheduler.attach(self.state)
        self.state.lag.start(loop)
        self._ticker = loop.create_task(self._tick_forever(), name="aiodagger-dashboard")
        logger.info("dashboard at %s", self.url)

    async def stop(self) -> None:
        self._cluster._scheduler.detach(self.state)
        self.state.lag.stop()
        if self._ticker is not None:
            self._ticker.cancel()
            await asyncio.gather(self._ticker, return_exceptions=True)
            self._ticker = None
        pages = list(self._pages)
        for page in pages:
            if page.sending is not None:
                page.sending.cancel()
        await asyncio.gather(*(p.ws.close(code=WSCloseCode.GOING_AWAY, message=b"cluster closed")
                               for p in pages), return_exceptions=True)
        await asyncio.gather(*(p.sending for p in pages if p.sending is not None),
                             return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- updates ---------------------------------------------------------------------------
    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(UPDATE_INTERVAL)
            if not self._pages:
                self.feed.skip()  # nobody to tell: a page that comes gets a hello
                continue
            try:
                self._broadcast()
            except Exception:  # a bug here must not stop the updates for good
                if not self._tick_failed:
                    self._tick_failed = True
                    logger.exception("dashboard: building an update failed")

    def _broadcast(self) -> None:
        update = json.dumps(self.feed.update(), separators=(",", ":"))
        hello: str | None = None
        for page in list(self._pages):
            if page.sending is not None and not page.sending.done():
                page.behind = True  # still reading the previous one: it gets a hello later
                continue
            text = update
            if page.behind:
                if hello is None:
                    hello = json.dumps(self.feed.hello(), separators=(",", ":"))
                text = hello
                page.behind = False
            self._send(page, text)

    def _send(self, page: _Page, text: str) -> None:
        page.sending = asyncio.get_running_loop().create_task(self._send_now(page, text))

    async def _send_now(self, page: _Page, text: str) -> None:
        try:
            await asyncio.wait_for(page.ws.send_str(text), SEND_TIMEOUT)
        except (ConnectionError, RuntimeError):
            self._pages.discard(page)  # gone; its handler sees the close
        except TimeoutError:
            self._pages.discard(page)
            await page.ws.close(code=WSCloseCode.TRY_AGAIN_LATER, message=b"too slow")

    # -- requests ----------------------------------------------------------------------
    @web.middleware
    async def _guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        bind = self.bind
        host = request.headers.get("Host", "")
        if not bind.host_allowed(host):
            return _refuse(403, f"Host {host!r} is not this dashboard's address")
        origin = request.headers.get("Origin")
        if origin is not None and not bind.origin_allowed(origin, host):
            return _refuse(403, f"requests from {origin!r} are refused: open the page itself")
        from_query = False
        # The script and style are the package's own files, the same for everyone: a page
        # in a notebook's iframe, whose cookie the browser may hold back, still gets them.
        if bind.token is not None and not request.path.startswith("/static/"):
            given = request.query.get("token")
            from_query = given is not None
            if given is None:
                given = request.cookies.get(self._cookie)
            if given is None:
                auth = request.headers.get("Authorization", "")
                if auth[:7].lower() == "bearer ":
                    given = auth[7:].strip()
            if given is None:
                response = _refuse(401, "this dashboard needs the cluster's token: open it with "
                                        "?token=... (cluster.dashboard_url has it)")
                response.headers["WWW-Authenticate"] = 'Bearer realm="aiodagger"'
                return response
            if not bind.token_ok(given):
                return _refuse(403, "wrong token")
        response = await handler(request)
        if not response.prepared:  # a websocket has sent its headers already
            if from_query:
                response.set_cookie(self._cookie, request.query["token"], httponly=True,
                                    samesite="Strict", path="/")
            _secure_headers(response)
        return response

    @property
    def _cookie(self) -> str:
        # Cookies ignore ports: one name per dashboard, so two on one host don't collide.
        return f"aiodagger-dashboard-{self.bind.port}"

    async def _page(self, request: web.Request) -> web.Response:
        return web.Response(body=self._files["index.html"], content_type="text/html",
                            charset="utf-8")

    async def _static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in STATIC:
            raise web.HTTPNotFound()
        return web.Response(body=self._files[name], content_type=STATIC[name], charset="utf-8")

    async def _api_state(self, request: web.Request) -> web.Response:
        return web.json_response(self.feed.hello())

    async def _metrics(self, request: web.Request) -> web.Response:
        response = web.Response(body=render(self.registry))
        response.headers["Content-Type"] = CONTENT_TYPE
        return response

    async def _websocket(self, request: web.Request) -> web.WebSocketResponse:
        # The page sends nothing: a message larger than a ping is not from it.
        ws = web.WebSocketResponse(heartbeat=20.0, compress=False, max_msg_size=1024, timeout=2.0)
        await ws.prepare(request)
        page = _Page(ws)
        self._pages.add(page)
        self._send(page, json.dumps(self.feed.hello(), separators=(",", ":")))
        try:
            async for _message in ws:  # reading is what notices the page's close
                pass
        finally:
            self._pages.discard(page)
            if page.sending is not None and not page.sending.done():
                page.sending.cancel()
        return ws


def _refuse(status: int, reason: str) -> web.Response:
    response = web.Response(status=status, text=reason + "\n")
    _secure_headers(response)
    return response


def _secure_headers(response: web.StreamResponse) -> None:
    headers = response.headers
    headers.setdefault("Content-Security-Policy", CSP)
    headers.setdefault("X-Content-Type-Options", "nosniff")
    headers.setdefault("Referrer-Policy", "no-referrer")  # the token may be in the URL
    headers.setdefault("Cache-Control", "no-store")
