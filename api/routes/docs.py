"""``/docs`` (Swagger UI) and ``/redoc``, served from assets installed with the project: no CDN.

FastAPI's own pages load Swagger UI and ReDoc from a CDN, so on a server without internet (or a
browser behind a strict proxy) ``/docs`` is a blank page. The assets come from the PyPI package
``fastapi-offline`` (MIT), a dependency of lorafleet that ships the distribution builds of
Swagger UI 5.32.6 (Apache-2.0) and ReDoc 2.5.3 (MIT) as package data; they are served from
its installed folder through an allow-list, like the web page's own assets.

Swagger UI keeps the key entered under "Authorize" across reloads (``persistAuthorization``).
The pages carry a Content-Security-Policy that lets them load nothing from anywhere else.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import FileResponse, HTMLResponse

from shared.errors import NotFound

router = APIRouter(include_in_schema=False)

ASSET_DIR = Path(str(files("fastapi_offline") / "static"))
ASSETS = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "redoc.standalone.js": "text/javascript",
    "favicon.png": "image/png",
}
OAUTH2_REDIRECT = "/docs/oauth2-redirect"
SWAGGER_PARAMETERS = {
    "persistAuthorization": True,
    "displayRequestDuration": True,
    "docExpansion": "list",
    "defaultModelsExpandDepth": 0,
    "tryItOutEnabled": False,
    # Swagger UI would otherwise send the document to validator.swagger.io for a badge.
    "validatorUrl": None,
}
# Belt and braces: the pages may load nothing from elsewhere (ReDoc's footer logo points at a
# CDN; this blocks it instead of letting a browser reach out). Inline scripts are FastAPI's
# page bootstrap; ReDoc runs its search in a blob: worker.
CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
    "script-src 'self' 'unsafe-inline'; worker-src 'self' blob:; connect-src 'self'; "
    "font-src 'self' data:"
)


def _offline(response: HTMLResponse) -> HTMLResponse:
    response.headers["Content-Security-Policy"] = CSP
    return response


def _root(request: Request) -> str:
    return str(request.scope.get("root_path", "")).rstrip("/")


@router.get("/docs")
def swagger_ui(request: Request) -> HTMLResponse:
    """Swagger UI on this server's OpenAPI document."""
    root = _root(request)
    page = get_swagger_ui_html(
        openapi_url=f"{root}{request.app.openapi_url}",
        title=f"{request.app.title} - API",
        swagger_js_url=f"{root}/docs/assets/swagger-ui-bundle.js",
        swagger_css_url=f"{root}/docs/assets/swagger-ui.css",
        swagger_favicon_url=f"{root}/docs/assets/favicon.png",
        oauth2_redirect_url=f"{root}{OAUTH2_REDIRECT}",
        swagger_ui_parameters=SWAGGER_PARAMETERS,
    )
    return _offline(page)


@router.get(OAUTH2_REDIRECT)
def swagger_ui_redirect() -> HTMLResponse:
    """Swagger UI's OAuth2 helper page (unused by bearer keys; kept so the UI finds it)."""
    return get_swagger_ui_oauth2_redirect_html()


@router.get("/redoc")
def redoc(request: Request) -> HTMLResponse:
    """ReDoc: the same document as a readable reference."""
    root = _root(request)
    page = get_redoc_html(
        openapi_url=f"{root}{request.app.openapi_url}",
        title=f"{request.app.title} - API reference",
        redoc_js_url=f"{root}/docs/assets/redoc.standalone.js",
        redoc_favicon_url=f"{root}/docs/assets/favicon.png",
        with_google_fonts=False,
    )
    return _offline(page)


@router.get("/docs/assets/{name}")
def asset(name: str) -> FileResponse:
    """One of the documentation pages' bundled scripts or stylesheets."""
    if name not in ASSETS:
        raise NotFound(f"no documentation asset {name}")
    return FileResponse(
        ASSET_DIR / name, media_type=ASSETS[name], headers={"Cache-Control": "max-age=86400"}
    )
