"""Run the backend under waitress, a production WSGI server with a thread pool (not Flask's dev server)."""

from __future__ import annotations

import logging

import waitress

from config.settings import Settings
from ml_backend.app import create_app

log = logging.getLogger(__name__)


def serve(settings: Settings, host: str, port: int) -> None:
    app = create_app(settings)
    app.extensions["annoloop"].service.registry.start_watcher()  # hot-swap new versions off the request path
    log.info(
        "serving",
        extra={
            "host": host,
            "port": port,
            "threads": settings.server.threads,
            "model_dir": str(settings.model_dir),
            "label_studio_url": settings.label_studio.url or None,
            "basic_auth": settings.basic_auth.enabled,
        },
    )
    # channel_timeout above Label Studio's 100 s predict timeout; large bodies are rejected by waitress itself.
    waitress.serve(
        app,
        host=host,
        port=port,
        threads=settings.server.threads,
        ident="annoloop",
        channel_timeout=120,
        max_request_body_size=64 * 1024 * 1024,
    )
