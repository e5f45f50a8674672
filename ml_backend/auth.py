"""HTTP basic auth for every route, as Label Studio's ML backend "Basic auth" setting sends it."""

from __future__ import annotations

import hmac

from flask import Flask, jsonify, request

from config.settings import BasicAuthSettings


def install_basic_auth(app: Flask, auth: BasicAuthSettings) -> None:
    if not auth.enabled:
        return
    user = auth.user.encode()
    password = auth.password.get_secret_value().encode()

    @app.before_request
    def _require_basic_auth():
        given = request.authorization
        ok = (
            given is not None
            and given.type == "basic"
            # Compare both parts in constant time, and always both, so timing tells nothing.
            and hmac.compare_digest((given.username or "").encode(), user)
            & hmac.compare_digest((given.password or "").encode(), password)
        )
        if not ok:
            resp = jsonify(error="authentication required: this backend needs HTTP basic auth")
            resp.status_code = 401
            resp.headers["WWW-Authenticate"] = 'Basic realm="annoloop"'
            return resp
        return None
