"""Access to the configured Label Studio server: the SDK client and the credentials for raw file downloads.

Label Studio 1.23 accepts two kinds of API key: legacy tokens (``Authorization: Token <key>``, disabled unless
the server enables them) and personal access tokens, which are JWT refresh tokens that must be exchanged for
short-lived access tokens (``Bearer``). label-studio-sdk already tells them apart and refreshes access tokens,
so we use its client for both the API and the headers of image downloads.
"""

from __future__ import annotations

import threading
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx
from label_studio_sdk import LabelStudio
from label_studio_sdk.core.api_error import ApiError

from config.settings import LabelStudioSettings


class LabelStudioNotConfigured(RuntimeError):
    """A Label Studio URL or API key is needed for this operation but is not set."""


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), port


class LabelStudioAccess:
    """The one Label Studio server annoloop talks to; built once from settings and shared."""

    def __init__(self, settings: LabelStudioSettings, timeout_s: float = 30.0):
        self.url = settings.url
        self._api_key = settings.api_key.get_secret_value()
        self._timeout_s = timeout_s
        self._client: LabelStudio | None = None
        self._lock = threading.Lock()
        self.api_calls = 0  # HTTP requests made through the client (token refreshes included)

    def _count(self, _request: httpx.Request) -> None:
        self.api_calls += 1

    @property
    def configured(self) -> bool:
        return bool(self.url and self._api_key)

    @property
    def client(self) -> LabelStudio:
        """The SDK client, created on first use (creating it validates a JWT key's expiry)."""
        if not self.configured:
            raise LabelStudioNotConfigured("LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY must be set")
        with self._lock:
            if self._client is None:
                try:
                    http = httpx.Client(
                        timeout=self._timeout_s, follow_redirects=True, event_hooks={"request": [self._count]}
                    )
                    self._client = LabelStudio(
                        base_url=self.url, api_key=self._api_key, timeout=self._timeout_s, httpx_client=http
                    )
                except ApiError as e:
                    detail = e.body.get("detail") if isinstance(e.body, dict) else e.body
                    raise LabelStudioNotConfigured(f"LABEL_STUDIO_API_KEY is not usable: {detail}") from None
            return self._client

    def auth_headers(self) -> dict[str, str]:
        """Authorization header for a download from this server (refreshes a PAT's access token if needed)."""
        # The SDK keeps token handling in its client wrapper; reuse it rather than re-implement the exchange.
        headers = self.client._client_wrapper.get_headers()
        return {"Authorization": headers["Authorization"]}

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """A raw API call (``path`` relative to the server, e.g. ``api/projects/3``) for what the SDK lacks,
        with the SDK's credentials and counted like its calls; httpx keywords (json, params, files, timeout).
        Raises ApiError on 4xx/5xx, like the SDK."""
        http = self.client._client_wrapper.httpx_client.httpx_client  # the httpx.Client we gave the SDK
        response = http.request(method, self.absolute(path), headers=self.auth_headers(), **kwargs)
        if response.status_code >= 400:
            try:
                body: Any = response.json()
            except ValueError:
                body = response.text
            raise ApiError(status_code=response.status_code, headers=dict(response.headers), body=body)
        return response

    def owns(self, url: str) -> bool:
        """True when ``url`` points at this Label Studio server (only then do we send it our token)."""
        return bool(self.url) and _origin(url) == _origin(self.url)

    def absolute(self, url: str) -> str:
        """Resolve a server-relative task URL such as ``/data/upload/1/x.jpg`` against this server."""
        if not self.url:
            raise LabelStudioNotConfigured(
                f"task URL {url!r} is relative to Label Studio, but LABEL_STUDIO_URL is not set"
            )
        return urljoin(self.url + "/", url.lstrip("/"))
