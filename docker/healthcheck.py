"""Container health check of the annoloop image: ``healthcheck.py serve [PORT]`` or ``healthcheck.py worker``.

serve:  GET http://127.0.0.1:PORT/health (default 9090) answers 200 with ``"status": "UP"``. Basic auth, when
        the settings turn it on (env BASIC_AUTH_USER or the ANNOLOOP_CONFIG file), is sent as the backend wants
        it on every route. A backend without model weights or without Redis is still UP: /health says which.
worker: an rq worker started in this container (same hostname) is registered in Redis. rq removes a
        worker's registration when its heartbeat stops, so a hung or dead worker turns unhealthy.

The settings come from annoloop's own loader, so this reads exactly what the service reads. Exit 0 healthy,
1 not; one line on stdout says why (``docker inspect`` shows it).
"""

from __future__ import annotations

import base64
import json
import socket
import sys
import urllib.request

from config.settings import load_settings

TIMEOUT_S = 4.0


def check_serve(port: int) -> str:
    settings = load_settings()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/health")
    if settings.basic_auth.enabled:
        pair = f"{settings.basic_auth.user}:{settings.basic_auth.password.get_secret_value()}"
        request.add_header("Authorization", "Basic " + base64.b64encode(pair.encode()).decode())
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:  # raises on 4xx/5xx
        body = json.loads(response.read() or b"{}")
    if body.get("status") != "UP":
        raise RuntimeError(f"/health answered status {body.get('status')!r}")
    return f"backend UP, default model {body.get('default_model_version')}, redis {body.get('redis')}"


def check_worker() -> str:
    import redis
    from rq import Worker

    settings = load_settings()
    conn = redis.Redis.from_url(
        settings.redis_url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S
    )
    host = socket.gethostname()
    mine = [w.name for w in Worker.all(connection=conn) if w.hostname == host]
    if not mine:
        raise RuntimeError(f"no rq worker of host {host} is registered in Redis")
    return f"rq worker {', '.join(mine)} registered"


def main(argv: list[str]) -> int:
    mode = argv[0] if argv else "serve"
    try:
        if mode == "serve":
            message = check_serve(int(argv[1]) if len(argv) > 1 else 9090)
        elif mode == "worker":
            message = check_worker()
        else:
            print(f"usage: healthcheck.py serve [PORT] | worker (got {mode!r})")
            return 2
    except Exception as e:  # refused, timeout, HTTP error, Redis error, bad setting: one line, no traceback
        print(f"unhealthy: {type(e).__name__}: {e}")
        return 1
    print(message)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
