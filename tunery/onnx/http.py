"""A small HTTP server around a `Predictor`: `/predict`, `/health`, `/metadata`.

Bound to 127.0.0.1 unless told otherwise. Bad requests (wrong JSON shape, empty or oversized
batches, empty or too-long texts) get a 4xx with the reason; an error while scoring becomes a 500
with a message, never a dead server.
"""

# No `from __future__ import annotations`: FastAPI must see the request model defined inside
# create_app as a class, not as a string it cannot resolve.
import logging
from typing import Any

from tunery.onnx.runtime import Predictor

log = logging.getLogger("tunery.serve")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


def create_app(predictor: Predictor, *, max_batch: int = 256, max_chars: int = 10_000) -> Any:
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, ConfigDict, Field

    class PredictRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        texts: list[str] = Field(min_length=1, max_length=max_batch)

    app = FastAPI(title="tunery", version=str(predictor.metadata.get("model_version")))

    @app.exception_handler(Exception)
    async def _unexpected(_request: Any, exc: Exception) -> JSONResponse:
        log.exception("prediction failed")
        return JSONResponse(status_code=500, content={"detail": f"internal error: {exc}"})

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "provider": predictor.provider}

    @app.get("/metadata")
    def metadata() -> dict[str, Any]:
        return predictor.metadata | {"max_batch": max_batch, "max_chars": max_chars}

    @app.post("/predict")
    def predict(request: PredictRequest) -> dict[str, Any]:
        for i, text in enumerate(request.texts):
            if not text.strip():
                raise HTTPException(status_code=422, detail=f"texts[{i}] is empty")
            if len(text) > max_chars:
                raise HTTPException(
                    status_code=413,
                    detail=f"texts[{i}] has {len(text)} characters (max {max_chars})",
                )
        preds = predictor.predict(request.texts)
        return {
            "model_version": predictor.metadata["model_version"],
            "variant": predictor.metadata["variant"],
            "predictions": preds.records(),
        }

    return app


def serve(
    predictor: Predictor,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    max_batch: int = 256,
    max_chars: int = 10_000,
) -> None:
    import uvicorn

    app = create_app(predictor, max_batch=max_batch, max_chars=max_chars)
    log.info(
        "serving %s (%s on %s) at http://%s:%d",
        predictor.source,
        predictor.metadata["variant"],
        predictor.provider,
        host,
        port,
    )
    uvicorn.run(app, host=host, port=port, log_level="info")
