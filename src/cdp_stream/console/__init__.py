"""The marketer console: a small static app served at ``/``, a pure client of the JSON API.

Why static rather than server-rendered: the API stays the one contract (the console can
do nothing a token holder could not do with curl, and every screen is tested through the
same endpoints), and there is nothing to build on the user's machine. The files are plain
HTML, CSS and JavaScript with no third-party library: the graph and charts are SVG drawn
by ``console.js``. The API token lives in the tab's ``sessionStorage`` only, sent in the
``Authorization`` header, never in a URL (so never in an access log or a Referer); the
pages forbid inline scripts and other origins (Content-Security-Policy).
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter, HTTPException
from fastapi.responses import Response

router = APIRouter(include_in_schema=False)

_STATIC = files(__name__).joinpath("static")
_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def _file(name: str) -> Response:
    kind = _TYPES.get(name[name.rfind(".") :]) if "." in name else None
    path = _STATIC.joinpath(name)
    if kind is None or "/" in name or not path.is_file():
        raise HTTPException(404, f"no console file {name!r}")
    return Response(path.read_bytes(), media_type=f"{kind}; charset=utf-8", headers=_HEADERS)


@router.get("/")
async def index() -> Response:
    return _file("index.html")


@router.get("/console/{name}")
async def static(name: str) -> Response:
    return _file(name)
