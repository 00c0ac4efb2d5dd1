"""The explorer's web app: one page and a JSON API over an `ExploreSession` (FastAPI, documented in
docs/explore.md).

Status codes: 200 answers; 409 a prompt already in the run; 413 a request body over `MAX_BODY_BYTES`; 422 a
request that is malformed or asks for something the run does not have (the message says which); 503 the model
is loading, unavailable (read-only run) or busy with a full queue (`Retry-After` says when to try again). Every
error body is `{"detail": "<one line>"}`.

The page and its assets come from the installed package (plotly.js from the plotly package), never a CDN, and a
Content-Security-Policy keeps the page from loading or sending anything elsewhere.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response

from tokentrail.errors import TokentrailError, first_line
from tokentrail.explore.schemas import (
    MAX_BODY_BYTES,
    SteerRequest,
    SteerResponse,
    StoreRequest,
    StoreResponse,
    TraceRequest,
    TraceResponse,
)
from tokentrail.explore.session import AlreadyStored, ExploreBusy, ExploreSession, ModelUnavailable

__all__ = ["create_app"]

# Plotly styles its plots inline and builds a few functions at run time, hence those two allowances; everything
# else (scripts, requests, images) must come from this server.
CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self' 'unsafe-eval'; style-src 'self' 'unsafe-inline'; "
                           "img-src 'self' data: blob:; connect-src 'self'; font-src 'self' data:; "
                           "frame-ancestors 'none'; base-uri 'none'; form-action 'none'")


def _static(name: str) -> Path:
    return Path(str(resources.files("tokentrail.explore") / "static" / name))


def _plotly_js() -> Path:
    import plotly

    return Path(plotly.__file__).parent / "package_data" / "plotly.min.js"


ASSETS = {
    "explore.js": ("text/javascript", lambda: _static("explore.js")),
    "explore.css": ("text/css", lambda: _static("explore.css")),
    "plotly.min.js": ("text/javascript", _plotly_js),
}


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is answered 413 before the app reads it (by its
    Content-Length, or while a body without one streams in)."""

    def __init__(self, app: Any, limit: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def _refuse(self, send: Any) -> None:
        body = json.dumps({"detail": f"request body over {self.limit} bytes; send a shorter prompt"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await self._refuse(send)
            return
        # Read the whole (bounded) body first, so that a body without a Content-Length is bounded too.
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._refuse(send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        delivered = False

        async def replay() -> Any:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _error(status: int, exc: Exception, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": first_line(exc)}, status_code=status, headers=headers)


def create_app(session: ExploreSession) -> FastAPI:
    """The app serving `session`: the page at `/`, its assets under `/assets/`, the API under `/api/`."""
    app = FastAPI(title="tokentrail explore", docs_url=None, redoc_url=None, openapi_url="/api/openapi.json")
    app.add_middleware(BodyLimit)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Any, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for error in exc.errors():
            where = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
            problems.append(f"{where}: {error.get('msg')}" if where else str(error.get("msg")))
        return JSONResponse({"detail": "; ".join(problems) or "invalid request"}, status_code=422)

    @app.exception_handler(ExploreBusy)
    async def busy(_request: Any, exc: ExploreBusy) -> JSONResponse:
        return _error(503, exc, {"Retry-After": "1"})

    @app.exception_handler(ModelUnavailable)
    async def unavailable(_request: Any, exc: ModelUnavailable) -> JSONResponse:
        return _error(503, exc, {"Retry-After": "2"} if session.model_status == "loading" else None)

    @app.exception_handler(AlreadyStored)
    async def conflict(_request: Any, exc: AlreadyStored) -> JSONResponse:
        return _error(409, exc)

    @app.exception_handler(TokentrailError)
    async def refused(_request: Any, exc: TokentrailError) -> JSONResponse:
        return _error(422, exc)

    @app.middleware("http")
    async def headers(request: Any, call_next: Any) -> Response:
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Cache-Control"] = "no-store"
        return response

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(_static("index.html"), media_type="text/html; charset=utf-8")

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        return Response(status_code=204)

    @app.get("/assets/{name}", include_in_schema=False)
    def asset(name: str) -> Response:
        if name not in ASSETS:  # only the named files: no path ever reaches the file system
            return JSONResponse({"detail": f"no asset {name!r}"}, status_code=404)
        media_type, where = ASSETS[name]
        return FileResponse(where(), media_type=media_type)

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        """The run, its model's state (loading, ready, unavailable and why), categories, axis, busy state."""
        return session.info()

    @app.get("/api/map")
    def stored_map() -> dict[str, Any]:
        """The stored map: every prompt's trajectory in the run's projection and depth view, lens top-1."""
        return session.stored_map()

    @app.post("/api/trace", response_model=TraceResponse)
    def trace(request: TraceRequest) -> dict[str, Any]:
        """Trace a prompt with the run's options and place it on the map."""
        return session.live_json(session.place(request.prompt, request.category))

    @app.post("/api/steer", response_model=SteerResponse)
    def steer(request: SteerRequest) -> SteerResponse:
        """Greedy continuations without and with steering, and both trajectories on the map."""
        return session.steer(request.prompt, request.layer, request.alpha, source=request.source,
                             target=request.target, vector_file=request.vector_file, position=request.position,
                             max_new_tokens=request.max_new_tokens)

    @app.post("/api/store", response_model=StoreResponse)
    def store(request: StoreRequest) -> dict[str, Any]:
        """Add a prompt to the run (traced into its store, listed in run.json)."""
        return session.add(request.prompt, request.category, prompt_id=request.id, label=request.label)

    return app
