"""A small HTTP server around a `Predictor`: `/predict`, `/health`, `/metadata`.

Bound to 127.0.0.1 unless told otherwise. `/predict` takes what the model takes: a text model
`{"texts": [...]}`; an image model image files as `multipart/form-data` (any field name; `images`
by convention) or `{"images": ["<base64>", ...]}` (a `data:image/...;base64,` prefix is allowed).
Bad requests (wrong JSON shape, empty or oversized batches, empty or too-long texts, an upload
that is not an image or is too large) get a 4xx with the reason; an error while scoring becomes
a 500 with a message, never a dead server.

The routes and request models are module-level; the predictor and the limits an app was created
with live in `app.state`, read by each route.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from dataclasses import asdict, dataclass
from typing import Any

from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunery.errors import DataValidationError
from tunery.onnx.runtime import Predictor

log = logging.getLogger("tunery.serve")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
MAX_IMAGE_BYTES = 10 * 2**20  # one uploaded image file
FORM_OVERHEAD = 2**20  # multipart boundaries and headers, on top of the images' bytes


@dataclass(frozen=True)
class Limits:
    max_batch: int = 256  # texts or images in one request
    max_chars: int = 10_000  # one text
    max_bytes: int = MAX_IMAGE_BYTES  # one image, as uploaded (before base64)

    def public(self, modality: str) -> dict[str, int]:
        """The limits /metadata shows: the ones that apply to this model's requests."""
        keys = ("max_batch", "max_bytes") if modality == "image" else ("max_batch", "max_chars")
        return {k: v for k, v in asdict(self).items() if k in keys}


class TextsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[str] = Field(min_length=1)


class ImagesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    images: list[str] = Field(min_length=1)  # base64 of the image files' bytes


def _state(request: Request) -> tuple[Predictor, Limits]:
    return request.app.state.predictor, request.app.state.limits


def _check_count(n: int, key: str, limits: Limits) -> None:
    # Here and not as the model's max_length: the limit is the app's, the model module-level.
    if n > limits.max_batch:
        raise HTTPException(
            status_code=422, detail=f"{key} has {n} items; at most {limits.max_batch} a request"
        )


def _answer(predictor: Predictor, items: list[Any]) -> dict[str, Any]:
    return {
        "model_version": predictor.metadata["model_version"],
        "variant": predictor.metadata["variant"],
        "predictions": predictor.predict(items).records(),
    }


common = APIRouter()
texts = APIRouter()
images = APIRouter()


@common.get("/health")
def health(request: Request) -> dict[str, Any]:
    return {"status": "ok", "provider": _state(request)[0].provider}


@common.get("/metadata")
def metadata(request: Request) -> dict[str, Any]:
    predictor, limits = _state(request)
    return predictor.metadata | limits.public(predictor.modality)


@texts.post("/predict")
def predict_texts(body: TextsRequest, request: Request) -> dict[str, Any]:
    predictor, limits = _state(request)
    _check_count(len(body.texts), "texts", limits)
    for i, text in enumerate(body.texts):
        if not text.strip():
            raise HTTPException(status_code=422, detail=f"texts[{i}] is empty")
        if len(text) > limits.max_chars:
            raise HTTPException(
                status_code=413,
                detail=f"texts[{i}] has {len(text)} characters (max {limits.max_chars})",
            )
    return _answer(predictor, body.texts)


def _b64_length(n_bytes: int) -> int:
    return (n_bytes + 2) // 3 * 4


def _too_large(name: str, size: int, limits: Limits) -> HTTPException:
    return HTTPException(
        status_code=413,
        detail=f"{name}: {size} bytes is over the limit of {limits.max_bytes} bytes an image",
    )


def _check_length(request: Request, most: int) -> None:
    """Refuse a body over `most` bytes from its Content-Length, before reading any of it."""
    try:
        length = int(request.headers.get("content-length") or 0)
    except ValueError:
        raise HTTPException(status_code=400, detail="Content-Length is not a number") from None
    if length > most:
        raise HTTPException(
            status_code=413, detail=f"the request has {length} bytes; at most {most} are read"
        )


async def _uploads(request: Request, limits: Limits) -> list[tuple[str, bytes]]:
    """(name, bytes) of each file of a multipart form; other fields are refused."""
    _check_length(request, limits.max_batch * limits.max_bytes + FORM_OVERHEAD)
    try:
        form = await request.form(max_files=limits.max_batch + 1)
    except StarletteHTTPException as exc:  # the parser's 400: too many files, a broken form
        detail = f"the form: {exc.detail} (at most {limits.max_batch} images a request)"
        raise HTTPException(status_code=422, detail=detail) from None
    found = []
    for i, (field, value) in enumerate(form.multi_items()):
        if isinstance(value, str):
            raise HTTPException(
                status_code=422, detail=f"form field {field!r} is not a file; upload image files"
            )
        name = value.filename or f"{field}[{i}]"
        if (value.size or 0) > limits.max_bytes:
            raise _too_large(name, value.size, limits)
        found.append((name, await value.read()))
    if not found:
        raise HTTPException(status_code=422, detail="no image files in the form")
    return found


async def _base64_images(request: Request, limits: Limits) -> list[tuple[str, bytes]]:
    """(name, bytes) of each base64 image of a JSON body `{"images": [...]}`."""
    _check_length(request, limits.max_batch * (_b64_length(limits.max_bytes) + 64) + FORM_OVERHEAD)
    try:
        body = ImagesRequest.model_validate(json.loads(await request.body()))
    except json.JSONDecodeError as exc:
        raise HTTPException(status_code=422, detail=f"not valid JSON: {exc}") from None
    except ValidationError as exc:
        detail = exc.errors(include_url=False, include_context=False, include_input=False)
        raise HTTPException(status_code=422, detail=detail) from None
    _check_count(len(body.images), "images", limits)
    found = []
    for i, text in enumerate(body.images):
        name = f"images[{i}]"
        data = "".join((text.partition(";base64,")[2] or text).split())  # line breaks allowed
        if len(data) > _b64_length(limits.max_bytes):
            raise _too_large(name, len(data) * 3 // 4, limits)
        try:
            found.append((name, base64.b64decode(data, validate=True)))
        except (binascii.Error, ValueError):
            raise HTTPException(status_code=422, detail=f"{name} is not valid base64") from None
    return found


@images.post("/predict")
async def predict_images(request: Request) -> dict[str, Any]:
    predictor, limits = _state(request)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        found = await _uploads(request, limits)
    elif kind in ("application/json", ""):
        found = await _base64_images(request, limits)
    else:
        raise HTTPException(
            status_code=415,
            detail=f"content type {kind!r}: send image files as multipart/form-data or JSON "
            '{"images": ["<base64>", ...]}',
        )
    _check_count(len(found), "images", limits)
    return await run_in_threadpool(_score_images, predictor, found)


def _score_images(predictor: Predictor, found: list[tuple[str, bytes]]) -> dict[str, Any]:
    """Decode (and shrink to the model's size) every upload first, so a bad one is a 4xx naming it
    before anything is scored; then one prediction for all."""
    loaded = []
    for name, raw in found:
        try:
            loaded.append(predictor.inputs.load(raw, name))
        except DataValidationError as exc:
            status = 413 if exc.rule == "image_too_large" else 422
            raise HTTPException(status_code=status, detail=str(exc)) from None
    return _answer(predictor, loaded)


async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
    log.exception("prediction failed")
    return JSONResponse(status_code=500, content={"detail": f"internal error: {exc}"})


def create_app(
    predictor: Predictor,
    *,
    max_batch: int = 256,
    max_chars: int = 10_000,
    max_bytes: int = MAX_IMAGE_BYTES,
) -> FastAPI:
    """The app for `predictor`'s modality: the text or the image `/predict`, plus the common routes."""
    app = FastAPI(title="tunery", version=str(predictor.metadata.get("model_version")))
    app.state.predictor = predictor
    app.state.limits = Limits(max_batch=max_batch, max_chars=max_chars, max_bytes=max_bytes)
    app.add_exception_handler(Exception, _unexpected)
    app.include_router(common)
    app.include_router(images if predictor.modality == "image" else texts)
    return app


def serve(
    predictor: Predictor,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    max_batch: int = 256,
    max_chars: int = 10_000,
    max_bytes: int = MAX_IMAGE_BYTES,
) -> None:
    import uvicorn

    app = create_app(predictor, max_batch=max_batch, max_chars=max_chars, max_bytes=max_bytes)
    log.info(
        "serving %s (%s %s model on %s) at http://%s:%d",
        predictor.source,
        predictor.metadata["variant"],
        predictor.modality,
        predictor.provider,
        host,
        port,
    )
    uvicorn.run(app, host=host, port=port, log_level="info")
