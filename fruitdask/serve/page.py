"""The public page at ``GET /``: a photo in, the fruit's card out (issue #24).

Four static files shipped as package data (``static/index.html``, ``app.js``, ``app.css``, ``icon.svg``):
nothing is built at run time and nothing comes from elsewhere (no CDN, no web font), so a
strict Content-Security-Policy holds: scripts, styles and requests from this origin only,
images from this origin and the ``blob:`` URL of the photo being shown. The page calls
``POST /v1/predict`` of the same process, behind the same limits.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
#: URL path -> (file under static/, media type).
FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/app.css": ("app.css", "text/css; charset=utf-8"),
    "/static/icon.svg": ("icon.svg", "image/svg+xml"),
}
PATHS = tuple(FILES)


@lru_cache(maxsize=len(FILES))
def asset(path: str) -> bytes:
    """The bytes of the file served at ``path`` (read once per process)."""
    name, _ = FILES[path]
    return resources.files(__package__).joinpath("static").joinpath(name).read_bytes()


async def serve_file(request: Request) -> Response:
    path = request.url.path
    return Response(asset(path), media_type=FILES[path][1], headers=HEADERS)


def routes() -> list[Route]:
    """The page's routes, for :func:`fruitdask.serve.app.create_app`."""
    return [Route(path, serve_file, methods=["GET", "HEAD"]) for path in FILES]
