"""The HTTP side of the service: FastAPI routes, limits, errors and the page.

Routes:

- ``GET /``: the page (``static/``: plain HTML, CSS and JS, nothing fetched from
  elsewhere) where a person translates and sees attention and the search;
- ``POST /v1/translate``, ``GET /v1/model``: rosetta's JSON API;
- ``GET /v1/heads``: the model directory's ``heads.json`` (``rosetta heads``: the
  role and importance of every attention head), a 404 saying how to make one;
- ``POST /translate``, ``GET /languages``: LibreTranslate's API, so its clients
  and browser extensions work unchanged (JSON or form bodies; its errors are 400);
- ``GET /health`` (the process answers) and ``GET /ready`` (the worker runs and
  the queue has room);
- ``/docs`` and ``/openapi.json`` from FastAPI.

Every error is JSON ``{"error": message, "status": code}``, with ``limit`` and
``value`` when a configured limit was broken: 400 (a body that is not JSON, or
is nested too deeply to read), 413 (texts per request, characters per text,
body bytes, attention weights or search items asked for), 422 (a body that does
not validate: types are strict, ``"3"`` or ``true`` is not an integer), 503
with ``Retry-After`` (queue full), 504 (a request that waited past
``timeout_s``). A request whose client disconnects is taken out of the queue.

Translation bodies are built on a worker thread, part by part
(``rosetta.serve.jsonbody``), so ``/health`` answers while a large one is
written.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rosetta.serve.batcher import Job
from rosetta.serve.jsonbody import encode
from rosetta.serve.schemas import Error, LibreTranslateRequest, TranslateRequest, TranslateResponse
from rosetta.serve.service import HEADS_MISSING, LANGUAGE_NAMES, RequestError, TranslationService
from rosetta.version import version

STATIC = resources.files("rosetta.serve") / "static"
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": Error, "description": text}
    for code, text in {
        400: "a body that is not JSON (or a form) or is nested too deeply; "
        "LibreTranslate's code for every invalid request",
        413: "over a limit: texts per request, characters per text, body bytes, "
        "attention weights (max_attention_weights) or search items (max_search_items)",
        422: "a body that does not validate (strict types), or search settings that conflict",
        503: "the queue is full (see Retry-After) or the server is shutting down",
        504: "the request waited longer than the server's timeout_s",
    }.items()
}


def error_response(
    status: int, message: str, limit: str | None = None, value: Any = None, **headers: str
) -> JSONResponse:
    body = {"error": message, "status": status}
    if limit is not None:
        body |= {"limit": limit, "value": value}
    return JSONResponse(body, status_code=status, headers=headers or None)


async def json_response(content: Any) -> Response:
    """A 200 JSON response built on a worker thread (``rosetta.serve.jsonbody``):
    the event loop goes on serving while a large body is written."""
    body = await asyncio.to_thread(encode, content)
    return Response(body, media_type="application/json")


class BodyLimit:
    """ASGI middleware: a body over ``limit`` bytes is a 413, whether its
    Content-Length says so up front or a chunked body grows past it."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        error = RequestError(
            413, f"the request body is over max_body_bytes ({self.limit:,} bytes)",
            "max_body_bytes", self.limit,
        )  # fmt: skip
        refusal = error_response(error.status, str(error), error.limit, error.value)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await refusal(scope, receive, send)
            return
        received, refused = 0, False

        async def counted() -> Message:
            # past the limit: answer 413 here, and tell the app the client has gone
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request" and not refused:
                received += len(message.get("body", b""))
                if received > self.limit:
                    refused = True
                    await refusal(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def unless_refused(message: Message) -> None:
            if not refused:
                await send(message)

        await self.app(scope, counted, unless_refused)


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(service: TranslationService) -> FastAPI:
    """The ASGI app serving ``service``; its worker starts and stops with the app."""
    config = service.config

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        service.batcher.start()
        yield
        # uvicorn has stopped accepting and answered the requests in flight
        await asyncio.to_thread(service.batcher.stop)

    app = FastAPI(
        title="rosetta",
        version=version(),
        summary="Neural machine translation, with the attention and the search made visible.",
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)

    # ---- errors, all JSON ----------------------------------------------------------------
    @app.exception_handler(RequestError)
    async def refused(_: Request, error: RequestError) -> JSONResponse:
        headers = {"Retry-After": str(config.retry_after_s)} if error.status == 503 else {}
        return error_response(error.status, str(error), error.limit, error.value, **headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(422, first_problem(error.errors()))

    @app.exception_handler(RecursionError)
    async def too_deep(_: Request, error: RecursionError) -> JSONResponse:
        # only input nests this deep: a JSON body of thousands of [ or {, on any route
        return error_response(400, "invalid request: the body is nested too deeply to read")

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, error: HTTPException) -> JSONResponse:
        return error_response(error.status_code, str(error.detail))

    @app.exception_handler(Exception)
    async def bug(_: Request, error: Exception) -> JSONResponse:
        return error_response(500, f"internal error: {type(error).__name__}: {error}")

    async def result_of(request: Request, job: Job) -> Any:
        """The job's result; 504 past the timeout; the job leaves the queue either way
        when the client disconnects or times out."""
        result = asyncio.wrap_future(job.future)
        gone = asyncio.ensure_future(_disconnected(request))
        waited = asyncio.get_running_loop().time() - job.arrived
        try:
            done, _ = await asyncio.wait(
                {result, gone}, timeout=max(0.0, config.timeout_s - waited),
                return_when=asyncio.FIRST_COMPLETED,
            )  # fmt: skip
        finally:
            gone.cancel()
        if result in done:
            return result.result()
        service.batcher.cancel(job)
        raise RequestError(
            504, f"the request waited over timeout_s ({config.timeout_s:g} s)",
            "timeout_s", config.timeout_s,
        )  # fmt: skip

    # ---- rosetta's API -----------------------------------------------------------------------
    @app.post("/v1/translate", response_model=TranslateResponse, responses=ERRORS)
    async def translate(body: TranslateRequest, request: Request) -> Response:
        """Translates one text or a list; optionally with attention and the search."""
        job = service.submit(body)
        translations = await result_of(request, job)
        search = job.payload.translator.settings()
        return await json_response(
            {"translations": translations, "engine": service.engine, "search": search}
        )

    @app.get("/v1/model")
    async def model() -> dict[str, Any]:
        """The model: languages, architecture, sizes, validation scores, search, limits."""
        return service.info()

    @app.get(
        "/v1/heads",
        responses={404: {"model": Error, "description": "the model directory has no heads.json"}},
    )
    async def heads() -> dict[str, Any]:
        """Every attention head's role and importance: ``heads.json`` as ``rosetta heads``
        wrote it (version 1), checked when the server started."""
        if service.heads is None:
            raise RequestError(404, HEADS_MISSING)
        return service.heads

    @app.get("/health")
    async def health() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/ready", responses={503: {"model": Error}})
    async def ready() -> JSONResponse:
        """Readiness: the worker runs and the queue has room; with what it has done
        (groups decoded, requests in them, the largest group; requests streamed and
        the steps of the continuous search)."""
        batcher = service.batcher
        if not batcher.alive:
            return error_response(503, "the translation worker is not running")
        if batcher.queued >= config.max_queue:
            return error_response(503, "the queue is full", "max_queue", config.max_queue)
        stats = batcher.stats
        return JSONResponse(
            {"status": "ready", "queued": batcher.queued, "batches": stats.batches,
             "requests_batched": stats.jobs, "largest_batch": stats.largest,
             "requests_streamed": stats.streamed, "decoding_steps": stats.steps}
        )  # fmt: skip

    # ---- LibreTranslate's API --------------------------------------------------------------
    source_language, target_language = service.languages

    @app.get("/languages")
    async def languages() -> list[dict[str, Any]]:
        """LibreTranslate's language list: the one pair this model serves."""
        return [
            {"code": code, "name": LANGUAGE_NAMES.get(code, code), "targets": targets}
            for code, targets in ((source_language, [target_language]), (target_language, []))
        ]

    libre_schema = LibreTranslateRequest.model_json_schema()
    libre_schema["properties"]["source"] |= {"enum": [source_language, "auto"]}
    libre_schema["properties"]["target"] |= {"enum": [target_language]}
    libre_body = {
        "required": True,
        "content": {
            kind: {"schema": libre_schema}
            for kind in ("application/json", "application/x-www-form-urlencoded")
        },
    }

    @app.post("/translate", openapi_extra={"requestBody": libre_body}, responses=ERRORS)
    async def libre_translate(request: Request) -> Response:
        """LibreTranslate's ``/translate``: ``q`` (a string or a list), ``source``
        (this model's or ``auto``), ``target``, ``format: text``, ``alternatives``."""
        body = await _libre_body(request)
        pair = f"{source_language}->{target_language}"
        if body.source not in (source_language, "auto") or body.target != target_language:
            raise RequestError(
                400, f"this server translates {pair} only, not {body.source}->{body.target}"
            )
        if body.format != "text":
            raise RequestError(400, "only format text is supported")
        # the model's search, asked for 1 + alternatives hypotheses (a beam over
        # max_beam is refused by the service, as a 400 here)
        wanted = service.translator.search.for_hypotheses(1 + body.alternatives)
        request_body = TranslateRequest(text=body.q, scores=False, **wanted)
        try:
            job = service.submit(request_body)
        except RequestError as error:  # LibreTranslate's code for an invalid request
            if error.status != 422:
                raise
            raise RequestError(400, str(error), error.limit, error.value) from None
        results = await result_of(request, job)
        texts = [result["text"] for result in results]
        others = [[h["text"] for h in result["hypotheses"][1:]] for result in results]
        single = isinstance(body.q, str)
        answer: dict[str, Any] = {"translatedText": texts[0] if single else texts}
        if body.alternatives:
            answer["alternatives"] = others[0] if single else others
        return await json_response(answer)

    # ---- the page ------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(str(STATIC / "index.html"), media_type="text/html; charset=utf-8")

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    return app


async def _libre_body(request: Request) -> LibreTranslateRequest:
    """A LibreTranslate request from JSON or a form (its values are strings, as
    LibreTranslate takes them); anything else, or text that is not UTF-8, is a 400."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    raw = await request.body()
    try:
        if kind == "application/x-www-form-urlencoded":
            # strict: Starlette's parser turns bytes that are not UTF-8 into U+FFFD
            fields = parse_qsl(raw.decode("utf-8"), keep_blank_values=True, errors="strict")
            data: Any = dict(fields)
        elif kind == "multipart/form-data":
            # the parts lie between ASCII delimiters: each is UTF-8 if the whole body is
            # (Starlette's parser reads a part that is not as Latin-1)
            raw.decode("utf-8")
            data = dict((await request.form()).items())
        else:
            data = json.loads(raw)
        return LibreTranslateRequest.model_validate(data)
    except ValidationError as error:
        raise RequestError(400, first_problem(error.errors())) from None
    except ValueError:  # not JSON, a form or UTF-8 (UnicodeDecodeError is a ValueError)
        raise RequestError(
            400, "invalid request: the body is not JSON or a form in UTF-8"
        ) from None
    except RecursionError:
        raise RequestError(400, "invalid request: the body is nested too deeply to read") from None


def first_problem(errors: list[dict[str, Any]]) -> str:
    """One line for a body that does not validate: where, and what is wrong."""
    first = errors[0]
    where = ".".join(str(part) for part in first["loc"] if part != "body") or "body"
    return f"invalid request: {where}: {first['msg']}"
