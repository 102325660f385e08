"""``gapless view``: the viewer's pages served on 127.0.0.1, with the Deep Zoom tiles a capped static
export left out cut from the slide on demand, so full resolution costs nothing on disk.

A folder of pages (``results/heatmaps``) is served as it is on disk: every file under it, nothing
outside it (a ``..`` or dot segment, a path or link that resolves outside, a ``Host`` other than the
server's own — against DNS rebinding — are refused with 403). A request for a tile
``…/slide_files/{level}/{col}_{row}.jpeg`` that is not on disk is cut from the source the pyramid
folder's ``pyramid.json`` names (:class:`pipeline.viewer.pyramid.SourceTiles`: the readers of
:mod:`pipeline.io`, so every format gapless reads). Open sources are kept in a small LRU cache shared by
the request threads (OpenSlide handles may be used from several threads of one process; each server
process opens its own). Every HTML page it serves learns so by a ``window.GAPLESS_SERVER`` line put
after ``<head>``: viewer.js then asks for levels finer than the folder holds. The same page opened
from disk, or from any other server, shows the levels on disk.

The standard library's ``ThreadingHTTPServer``; no dependency.
"""

from __future__ import annotations

import html
import mimetypes
import re
import shutil
import sys
import threading
from collections import OrderedDict
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

from pipeline.errors import GaplessError
from pipeline.viewer.deepzoom import DZI_NAME

HOST = "127.0.0.1"  # never another interface: the pages and slides are the user's, not the network's
OPEN_SOURCES = 4  # slides kept open at once
SERVER_MARK = b'<script>window.GAPLESS_SERVER = {"tiles": "source"};</script>'
_TILE = re.compile(rf"^(?P<pyramid>.+)/{DZI_NAME}_files/(?P<level>\d{{1,3}})/(?P<col>\d{{1,7}})_(?P<row>\d{{1,7}})\.(?P<ext>jpeg|jpg|png)$")
_HEAD = re.compile(rb"<head[^>]*>", re.IGNORECASE)
_TILE_CACHE = "max-age=3600"  # a slide's pixels do not change under a running server


class SourceCache:
    """The last ``size`` pyramid folders' :class:`SourceTiles`, shared by the request threads.

    A folder whose source cannot be opened is remembered with its error (said once, on the console), so
    its tiles fail fast; restart the server once the slide is back. An evicted source is not closed
    here: a request may still be reading it, and it closes when the last one lets go of it.
    """

    def __init__(self, size: int = OPEN_SOURCES, log=None):
        self.size = size
        self._open: OrderedDict[Path, object] = OrderedDict()
        self._lock = threading.Lock()
        self._log = log or (lambda text: print(text, file=sys.stderr, flush=True))

    def get(self, pyramid_dir: Path):
        """The :class:`SourceTiles` of ``pyramid_dir``; the ``GaplessError`` of opening it otherwise."""
        from pipeline.viewer.pyramid import SourceTiles

        with self._lock:  # one opening per folder, even when a page asks for six of its tiles at once
            entry = self._open.get(pyramid_dir)
            if entry is None:
                try:
                    entry = SourceTiles(pyramid_dir)
                except GaplessError as exc:
                    entry = exc
                    self._log(f"gapless view: {exc.message}; serving the levels {pyramid_dir} holds only")
                self._open[pyramid_dir] = entry
                while len(self._open) > self.size:
                    self._open.popitem(last=False)
            else:
                self._open.move_to_end(pyramid_dir)
        if isinstance(entry, GaplessError):
            raise entry
        return entry


class ViewerServer(ThreadingHTTPServer):
    """A ``ThreadingHTTPServer`` on 127.0.0.1 serving ``root`` (a folder, resolved)."""

    daemon_threads = True

    def __init__(self, root: Path, port: int = 0, verbose: bool = False):
        self.root = root
        self.verbose = verbose
        self.sources = SourceCache()
        super().__init__((HOST, port), ViewerHandler)

    @property
    def port(self) -> int:
        return self.server_address[1]

    def url(self, path: str = "") -> str:
        return f"http://{HOST}:{self.port}/{path}"


class ViewerHandler(BaseHTTPRequestHandler):
    """GET and HEAD of files under the root, and of Deep Zoom tiles cut on demand; nothing else."""

    server: ViewerServer
    server_version = "gapless-view"
    protocol_version = "HTTP/1.1"  # keep-alive: a page loads many tiles

    def do_GET(self):
        self._respond(send_body=True)

    def do_HEAD(self):
        self._respond(send_body=False)

    def _respond(self, send_body: bool) -> None:
        if not self._host_allowed():
            return self._refuse(HTTPStatus.FORBIDDEN, "Host not allowed: open the URL gapless view printed")
        parts = request_parts(self.path)
        if parts is None:
            return self._refuse(HTTPStatus.FORBIDDEN, "outside the served folder")
        root = self.server.root
        target = root.joinpath(*parts)
        resolved = target.resolve()
        if resolved != root and root not in resolved.parents:
            return self._refuse(HTTPStatus.FORBIDDEN, "outside the served folder")
        if resolved.is_dir():
            if not urlsplit(self.path).path.endswith("/"):
                return self._redirect(urlsplit(self.path).path + "/")
            index = resolved / "index.html"
            if index.is_file():
                return self._send_file(index, send_body)
            return self._send(HTTPStatus.OK, "text/html; charset=utf-8", listing(resolved, root), send_body)
        if resolved.is_file():
            return self._send_file(resolved, send_body)
        tile = _TILE.match("/".join(parts))
        if tile:
            return self._send_cut_tile(tile, send_body)
        return self._refuse(HTTPStatus.NOT_FOUND, "not found")

    def _host_allowed(self) -> bool:
        host = (self.headers.get("Host") or "").strip().lower()
        return host in (f"{HOST}:{self.server.port}", f"localhost:{self.server.port}")

    def _send_cut_tile(self, tile: re.Match, send_body: bool) -> None:
        pyramid_dir = self.server.root / tile["pyramid"]
        if not (pyramid_dir / f"{DZI_NAME}.dzi").is_file():
            return self._refuse(HTTPStatus.NOT_FOUND, "not found")
        try:
            tiles = self.server.sources.get(pyramid_dir)
            if tile["ext"].replace("jpg", "jpeg") != tiles.format.lower().replace("jpg", "jpeg"):
                return self._refuse(HTTPStatus.NOT_FOUND, f"the pyramid's tiles are {tiles.format}")
            data = tiles.tile(int(tile["level"]), int(tile["col"]), int(tile["row"]))
        except KeyError as exc:
            return self._refuse(HTTPStatus.NOT_FOUND, str(exc.args[0]))
        except GaplessError as exc:
            return self._refuse(HTTPStatus.NOT_FOUND, exc.message)
        ctype = "image/png" if tile["ext"] == "png" else "image/jpeg"
        self._send(HTTPStatus.OK, ctype, data, send_body, cache=_TILE_CACHE)

    def _send_file(self, path: Path, send_body: bool) -> None:
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype in ("application/javascript", "application/json"):
            ctype += "; charset=utf-8"
        cache = _TILE_CACHE if f"/{DZI_NAME}_files/" in path.as_posix() else "no-cache"
        if path.suffix.lower() in (".html", ".htm"):
            return self._send(HTTPStatus.OK, ctype, mark_page(path.read_bytes()), send_body, cache=cache)
        with open(path, "rb") as f:
            size = path.stat().st_size
            self._head(HTTPStatus.OK, ctype, size, cache)
            if send_body:
                shutil.copyfileobj(f, self.wfile)

    def _send(self, status: HTTPStatus, ctype: str, body: bytes, send_body: bool, cache: str = "no-cache") -> None:
        self._head(status, ctype, len(body), cache)
        if send_body:
            self.wfile.write(body)

    def _head(self, status: HTTPStatus, ctype: str, length: int, cache: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(length))
        self.send_header("Cache-Control", cache)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()

    def _redirect(self, location: str) -> None:
        self.send_response(HTTPStatus.MOVED_PERMANENTLY)
        self.send_header("Location", quote(location))
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _refuse(self, status: HTTPStatus, why: str) -> None:
        body = f"{status.value} {status.phrase}: {why}\n".encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_request(self, code="-", size="-"):
        if self.server.verbose or (isinstance(code, int) and code >= 400):
            super().log_request(code, size)

    def log_message(self, format, *args):
        sys.stderr.write(f"gapless view: {self.address_string()} {format % args}\n")


def request_parts(raw_path: str) -> list[str] | None:
    """The path segments of a request's URL (percent-decoded), or None when it must be refused: a ``.``,
    ``..`` or hidden (dot) segment, a backslash, a NUL, bad UTF-8, or a path not starting with ``/``."""
    path = urlsplit(raw_path).path
    if not path.startswith("/"):
        return None
    try:
        text = unquote(path, errors="strict")
    except UnicodeDecodeError:
        return None
    if "\x00" in text or "\\" in text:
        return None
    parts = [p for p in text.split("/") if p]
    if any(p.startswith(".") for p in parts):
        return None
    return parts


def mark_page(page: bytes) -> bytes:
    """The page with :data:`SERVER_MARK` right after ``<head>`` (unchanged without one)."""
    match = _HEAD.search(page)
    return page if match is None else page[: match.end()] + SERVER_MARK + page[match.end():]


def listing(folder: Path, root: Path) -> bytes:
    """A plain page linking the HTML pages and subfolders of ``folder`` (a folder without index.html)."""
    items = sorted(p for p in folder.iterdir() if not p.name.startswith(".") and (p.is_dir() or p.suffix == ".html"))
    links = "".join(f'<li><a href="{quote(p.name)}{"/" if p.is_dir() else ""}">{html.escape(p.name)}</a></li>' for p in items)
    rel = folder.relative_to(root).as_posix()
    title = html.escape("/" if rel == "." else f"/{rel}/")
    return (f"<!doctype html><meta charset=utf-8><title>{title}</title><h1>{title}</h1><ul>{links}</ul>").encode()


def start_server(root: str | Path, port: int = 0, verbose: bool = False) -> tuple[ViewerServer, str]:
    """A :class:`ViewerServer` bound to 127.0.0.1:``port`` (0: a free one), not yet serving, and the URL
    to open: ``root``'s index.html, the page ``root`` names, or the folder."""
    root = Path(root)
    if not root.exists():
        raise GaplessError(root, "no such folder or page", "pass the viewer's folder, e.g. results/heatmaps")
    page = ""
    if root.is_file():
        if root.suffix.lower() not in (".html", ".htm"):
            raise GaplessError(root, "is neither a folder nor an HTML page", "pass the viewer's folder or one of its pages")
        root, page = root.parent, quote(root.name)
    elif (root / "index.html").is_file():
        page = "index.html"
    if not (0 <= port <= 65535):
        raise GaplessError(None, f"port {port} is not 0..65535", "pass --port 0 for a free port")
    try:
        server = ViewerServer(root.resolve(), port, verbose)
    except OSError as exc:
        raise GaplessError(None, f"cannot listen on {HOST}:{port} ({exc.strerror or exc})",
                           "pass another --port, or --port 0 for a free one") from None
    return server, server.url(page)


def serve(root: str | Path, port: int = 0, verbose: bool = False, ready=None) -> None:
    """Serve ``root`` on 127.0.0.1 until interrupted (Ctrl-C, SIGTERM); ``ready(url)`` once listening."""
    server, url = start_server(root, port, verbose)
    try:
        if ready is not None:
            ready(url)
        server.serve_forever()
    finally:
        server.server_close()
