"""``GET /cdp.js``: the website library (``static/cdp.js``), served by the collector.

Loaded once at import and gzipped once; answered with an ETag (a digest of the file) so
browsers revalidate with ``If-None-Match`` and get a 304, and a short max-age so a new
release reaches pages within the hour. Its size budget, 6 KB gzipped, is held by a test.
"""

from __future__ import annotations

import gzip
import hashlib
from importlib.resources import files

from fastapi import APIRouter, Request
from fastapi.responses import Response

router = APIRouter(tags=["collector"])

SOURCE = files("cdp_stream.collector").joinpath("static/cdp.js").read_bytes()
GZIPPED = gzip.compress(SOURCE, compresslevel=9, mtime=0)
ETAG = '"' + hashlib.sha256(SOURCE).hexdigest()[:32] + '"'
_HEADERS = {
    "ETag": ETAG,
    "Cache-Control": "public, max-age=3600",
    "Vary": "Accept-Encoding",
    "Access-Control-Allow-Origin": "*",  # public code; lets pages load it with integrity=
}


def _tokens(header: str) -> set[str]:
    """The comma-separated values of a header, without parameters or weak-tag prefixes."""
    return {part.split(";")[0].strip().removeprefix("W/") for part in header.split(",")}


@router.get("/cdp.js", include_in_schema=False)
async def library(request: Request) -> Response:
    if _tokens(request.headers.get("if-none-match", "")) & {ETAG, "*"}:
        return Response(status_code=304, headers=_HEADERS)
    media = "text/javascript; charset=utf-8"
    if "gzip" in _tokens(request.headers.get("accept-encoding", "")):
        return Response(GZIPPED, media_type=media, headers={**_HEADERS, "Content-Encoding": "gzip"})
    return Response(SOURCE, media_type=media, headers=_HEADERS)
