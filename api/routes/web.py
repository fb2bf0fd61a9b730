"""The web page: a static single-page app served by the API itself (no CDN, no build step).

The page talks only to the native JSON API with the key the user typed (kept in the browser's
localStorage and sent as ``Authorization: Bearer``), so it needs no session, cookie or CSRF
machinery, and it can do nothing a curl with the same key could not. The page and its assets are
public; every piece of data behind them is not.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from shared.errors import NotFound

router = APIRouter(include_in_schema=False)

STATIC = Path(__file__).resolve().parent.parent / "static"
# An allow-list, not a directory mount: nothing else under the package can be fetched.
ASSETS = {"app.js": "text/javascript", "try.js": "text/javascript", "style.css": "text/css"}
NO_CACHE = {"Cache-Control": "no-cache"}  # revalidate, so an upgrade shows up on reload


@router.get("/")
def index() -> FileResponse:
    """The jobs page (the job view is the same page at ``#/jobs/<id>``)."""
    return FileResponse(STATIC / "index.html", media_type="text/html", headers=NO_CACHE)


@router.get("/static/{name}")
def asset(name: str) -> FileResponse:
    """One of the page's own scripts or stylesheets."""
    if name not in ASSETS:
        raise NotFound(f"no static asset {name}")
    return FileResponse(STATIC / name, media_type=ASSETS[name], headers=NO_CACHE)
