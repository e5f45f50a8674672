"""Download and decode task images, concurrently and defensively.

Why our own downloader rather than label-studio-sdk's ``get_local_path``: that helper writes every file to
a disk cache and has no size limit, while the backend must refuse huge files before reading them whole, keep
images in memory, and send the Label Studio token only to the Label Studio server, never to a third-party
URL a task happens to carry. Token handling itself is the SDK's (see ``LabelStudioAccess``).
"""

from __future__ import annotations

import io
import logging
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import cv2
import numpy as np
import requests
from PIL import Image, ImageOps, UnidentifiedImageError
from requests.adapters import HTTPAdapter

from annoloop.labelstudio import LabelStudioAccess, LabelStudioNotConfigured
from config.settings import ImageSettings

log = logging.getLogger(__name__)


class ImageError(Exception):
    """This one image cannot be used; the message says why in words a user can act on."""


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Bytes -> HxWx3 uint8 BGR array (what ultralytics expects), EXIF orientation applied.

    The pixel count is checked from the header before any pixel is decoded, so a decompression bomb costs
    nothing. EXIF rotation is applied because browsers (and so annotators) see images rotated that way.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise ImageError(f"image is {w}x{h} = {w * h} pixels, above images.max_pixels={max_pixels}")
            im.load()
            if im.mode != "RGB":
                im = im.convert("RGB")
            ImageOps.exif_transpose(im, in_place=True)  # no copy when there is nothing to rotate
            rgb = np.asarray(im)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"image is too large to decode: {e}") from None
    except UnidentifiedImageError:
        raise ImageError("not a readable image (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"corrupt or truncated image: {e}") from None
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)  # half the cost of a numpy channel flip + copy


class ImageFetcher:
    """Fetches task image URLs: Label Studio relative paths, Label Studio absolute URLs, other http(s) URLs."""

    def __init__(self, labelstudio: LabelStudioAccess, settings: ImageSettings):
        self.ls = labelstudio
        self.settings = settings
        self._session = requests.Session()
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=settings.fetch_workers)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._pool = ThreadPoolExecutor(settings.fetch_workers, thread_name_prefix="image-fetch")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._session.close()

    def resolve(self, url: str) -> tuple[str, dict[str, str]]:
        """The absolute URL to GET and the headers to send (the token only to Label Studio itself)."""
        if not isinstance(url, str) or not url.strip():
            raise ImageError("image URL is empty")
        url = url.strip()
        scheme = urlsplit(url).scheme.lower()
        try:
            if not scheme and url.startswith("/"):
                url = self.ls.absolute(url)
            elif scheme not in ("http", "https"):
                raise ImageError(
                    f"unsupported image URL scheme {scheme or '(none)'!r} in {url[:80]!r}: "
                    "use Label Studio uploads, local files or http(s) URLs"
                )
            return url, (self.ls.auth_headers() if self.ls.owns(url) else {})
        except LabelStudioNotConfigured as e:
            raise ImageError(str(e)) from None

    def download(self, url: str) -> bytes:
        target, headers = self.resolve(url)
        limit = self.settings.max_bytes
        try:
            with self._session.get(
                target, headers=headers, timeout=self.settings.timeout_s, stream=True
            ) as r:
                if r.status_code != 200:
                    hint = " (check LABEL_STUDIO_API_KEY)" if r.status_code in (401, 403) and headers else ""
                    raise ImageError(f"GET {_short(url)} answered HTTP {r.status_code}{hint}")
                declared = int(r.headers.get("Content-Length") or 0)
                if declared > limit:
                    raise ImageError(f"image is {declared} bytes, above images.max_bytes={limit}")
                buf = bytearray()
                for chunk in r.iter_content(64 * 1024):
                    buf += chunk
                    if len(buf) > limit:
                        raise ImageError(f"image is over images.max_bytes={limit} bytes")
                return bytes(buf)
        except requests.RequestException as e:
            raise ImageError(f"cannot download {_short(url)}: {type(e).__name__}") from None

    def fetch(self, url: str) -> np.ndarray:
        return decode_image(self.download(url), self.settings.max_pixels)

    def fetch_many(self, urls: list[str]) -> list[np.ndarray | ImageError]:
        """Fetch all URLs concurrently; each entry is an image or the ImageError that stopped it, in order."""

        def one(url: str) -> np.ndarray | ImageError:
            try:
                return self.fetch(url)
            except ImageError as e:
                return e
            except Exception as e:  # a bug in one download must not take the batch down
                log.exception("image fetch failed", extra={"url": _short(url)})
                return ImageError(f"unexpected error: {type(e).__name__}")

        return list(self._pool.map(one, urls))


def _short(url: str, n: int = 120) -> str:
    return url if len(url) <= n else url[: n - 3] + "..."
