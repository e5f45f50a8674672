"""Flask app factory for the ML backend: everything it needs is passed in, nothing lives in globals."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import redis
from flask import Flask, jsonify, request
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException

from annoloop import __version__
from annoloop.images import ImageFetcher
from annoloop.labelstudio import LabelStudioAccess
from annoloop.model_store import DEFAULT_PROJECT, ModelStore
from config.settings import Settings
from ml_backend.auth import install_basic_auth
from ml_backend.model_holder import ModelRegistry
from ml_backend.predict_service import BadRequest, PredictService
from ml_backend.schemas import PredictRequest, SetupRequest, WebhookEvent, project_key
from training.trigger import WebhookError, handle_webhook, parse_webhook

log = logging.getLogger(__name__)


@dataclass
class Backend:
    """The long-lived parts one app instance uses; built once per process."""

    settings: Settings
    service: PredictService
    redis: redis.Redis

    @classmethod
    def build(cls, settings: Settings) -> Backend:
        store = ModelStore(settings.model_dir)
        registry = ModelRegistry(store, settings.inference)
        fetcher = ImageFetcher(LabelStudioAccess(settings.label_studio), settings.images)
        # Short timeouts: /health has 1 s in Label Studio, and Redis must never stall a prediction.
        client = redis.Redis.from_url(settings.redis_url, socket_timeout=0.3, socket_connect_timeout=0.3)
        # Load what is already published before the first request: Label Studio gives /setup only 3 s.
        for project in [DEFAULT_PROJECT, *store.projects()]:
            registry.holder(project).get()
        return cls(settings, PredictService(settings, registry, fetcher), client)

    def redis_ok(self) -> bool:
        try:
            return bool(self.redis.ping())
        except redis.RedisError:
            return False


def _json_body() -> Any:
    body = request.get_json(silent=True)
    if body is None:
        raise BadRequest("request body must be JSON (Content-Type: application/json)")
    return body


def _validate(model: type, body: Any):
    try:
        return model.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise BadRequest(f"invalid request: {where}: {first['msg']}") from None


def create_app(settings: Settings, backend: Backend | None = None) -> Flask:
    backend = backend or Backend.build(settings)
    service = backend.service
    app = Flask("annoloop")
    app.extensions["annoloop"] = backend
    install_basic_auth(app, settings.basic_auth)

    @app.errorhandler(BadRequest)
    def _bad_request(e: BadRequest):
        # Label Studio shows only "400 Client Error" for /setup: the reason must be in our log too.
        log.warning("bad request", extra={"path": request.path, "reason": str(e)})
        return jsonify(error=str(e)), 400

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException):
        return jsonify(error=e.description), e.code

    @app.errorhandler(Exception)
    def _unexpected(e: Exception):
        log.exception("unhandled error", extra={"path": request.path})
        return jsonify(error=f"internal error: {type(e).__name__}"), 500

    @app.get("/health")
    @app.get("/")
    def health():
        registry = service.registry
        default = registry.holder(DEFAULT_PROJECT).get()
        models = registry.status()
        body: dict[str, Any] = {
            "status": "UP",
            "model_class": "annoloop",
            "version": __version__,
            "default_model_version": default.version if default else None,
            "models": models,
            "loaded_models": registry.loaded_count(),
            "redis": backend.redis_ok(),
        }
        if default is None and not any(m.get("model_version") for m in models.values()):
            body["warning"] = f"no model weights found under {settings.model_dir}: predictions are empty"
        return jsonify(body)

    @app.post("/setup")
    def setup():
        req = _validate(SetupRequest, _json_body())
        version = service.setup(project_key(req.project), req.label_config)
        return jsonify(model_version=version or "no-model")

    @app.post("/predict")
    def predict():
        body = _json_body()
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object with a 'tasks' list")
        req = _validate(PredictRequest, body)
        if not req.label_config:
            raise BadRequest("invalid request: label_config is missing")
        first = req.tasks[0] if req.tasks and isinstance(req.tasks[0], dict) else {}
        project = project_key(req.project if req.project else first.get("project"))
        started = time.perf_counter()
        version, outcomes = service.predict(project, req.tasks, req.label_config)
        if version is None:
            # No model: answer no predictions at all. Label Studio stores nothing for an empty list and asks
            # again later, instead of storing empty predictions under a placeholder version.
            why = outcomes[0].error if outcomes else None
            return jsonify(results=[], model_version=None, error=why or "no model is loaded for this project")
        results = []
        for o in outcomes:
            item: dict[str, Any] = {"result": o.result, "score": o.score, "model_version": version}
            if o.error:
                item["error"] = o.error
            results.append(item)
        resp = jsonify(results=results, model_version=version)
        resp.headers["Server-Timing"] = f"predict;dur={(time.perf_counter() - started) * 1000:.1f}"
        return resp

    @app.post("/webhook")
    def webhook():
        # Label Studio sends webhooks inside the annotator's request and waits at most 1 s: Redis work only.
        started = time.perf_counter()
        body = _json_body()
        event = _validate(WebhookEvent, body)
        try:
            call = parse_webhook(body)
        except WebhookError as e:
            raise BadRequest(str(e)) from None
        try:
            outcome = handle_webhook(backend.redis, call, settings.training)
        except redis.RedisError as e:
            log.warning(
                "webhook",
                extra={"action": event.action, "project": call.project, "status": "redis unavailable"},
            )
            message = f"redis is unavailable, the {event.action} webhook was not recorded: {type(e).__name__}"
            return jsonify(error=message), 503
        ms = (time.perf_counter() - started) * 1000
        log.info(
            "webhook",
            extra={"action": event.action, **outcome.to_dict(), "ms": round(ms, 2)},
        )
        resp = jsonify(action=event.action, **outcome.to_dict())
        resp.headers["Server-Timing"] = f"webhook;dur={ms:.2f}"
        return resp

    return app
