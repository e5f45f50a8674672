"""Shared fixtures: real redis-server, real HTTP servers, real tiny YOLO models (trained once, cached)."""

from __future__ import annotations

import os

os.environ.setdefault("YOLO_OFFLINE", "1")

import contextlib
import http.server
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from annoloop.demo import redis_server_command
from annoloop.model_store import DEFAULT_PROJECT, ModelStore
from training.bootstrap import TEST_RECIPES, cached_starter_model
from training.synthetic import Shape, render_scene

REPO = Path(__file__).resolve().parents[1]
# The team's shared material (datasets) lives beside the checkout; ANNOLOOP_SHARED_DIR points elsewhere.
SHARED = Path(os.environ.get("ANNOLOOP_SHARED_DIR", REPO.parent / "shared"))
VENV_BIN = Path(sys.executable).parent
# Outside the checkout so a clean checkout (CI) still finds the models trained by earlier runs.
MODEL_CACHE = Path(os.environ.get("ANNOLOOP_TEST_CACHE", Path.home() / ".cache" / "annoloop" / "test-models"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(
    url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            break
        with contextlib.suppress(requests.RequestException):
            if requests.get(url, timeout=1).status_code < 500:
                return
        time.sleep(0.2)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise RuntimeError(f"{url} did not come up within {timeout:.0f}s\n{tail}")


# --- Redis -------------------------------------------------------------------------------------------


def start_redis(workdir: Path, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """A real redis-server of our own (nothing persisted), answering before this returns."""
    import redis

    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server is not installed (apt install redis-server)")
    port = port or free_port()
    proc = subprocess.Popen(
        redis_server_command(exe, port, workdir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    client = redis.Redis(port=port)
    for _ in range(100):
        with contextlib.suppress(redis.ConnectionError):
            if client.ping():
                break
        time.sleep(0.05)
    return proc, f"redis://127.0.0.1:{port}/0"


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> Iterator[str]:
    """A real redis-server of our own on a free port, so tests never touch another instance's data."""
    proc, url = start_redis(tmp_path_factory.mktemp("redis"))
    yield url
    proc.terminate()
    proc.wait(10)


# --- Models ------------------------------------------------------------------------------------------


@pytest.fixture
def private_redis(tmp_path) -> Iterator[str]:
    """A redis-server of the test's own: what its worker leaves behind (keys, jobs, a dead worker's state)
    stays in it and cannot reach another test's worker."""
    proc, url = start_redis(tmp_path)
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="session")
def starter_weights() -> Callable[[str], Path]:
    """Weights of a tiny model trained from the ultralytics YAML on generated shapes, per task."""

    def get(task: str) -> Path:
        return cached_starter_model(task, MODEL_CACHE, **TEST_RECIPES[task])

    return get


def publish(model_dir: Path, weights: Path, version: str, project: str = DEFAULT_PROJECT) -> None:
    store = ModelStore(model_dir)
    if store.version(project, version).path.exists():
        store.set_current(project, version)
    else:
        store.publish(project, version, weights, {"source": "test"})


# --- Images ------------------------------------------------------------------------------------------


@dataclass
class Scene:
    name: str
    width: int
    height: int
    shapes: list[Shape]


@dataclass
class ImageServer:
    """A plain HTTP file server that records the headers of every request it gets."""

    url: str
    root: Path
    seen: list[dict[str, str]] = field(default_factory=list)

    def write_scenes(self, n: int, seed: int, size: tuple[int, int] = (320, 240)) -> list[Scene]:
        rng = np.random.default_rng(seed)
        scenes = []
        for i in range(n):
            rgb, shapes = render_scene(rng, size[0], size[1], max_shapes=3)
            name = f"scene-{seed}-{i}.png"
            Image.fromarray(rgb).save(self.root / name)
            scenes.append(Scene(name, size[0], size[1], shapes))
        return scenes


@pytest.fixture(scope="session")
def image_server(tmp_path_factory) -> Iterator[ImageServer]:
    root = tmp_path_factory.mktemp("images")
    server_ref: list[ImageServer] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(root), **kw)

        def do_GET(self):
            server_ref[0].seen.append({"path": self.path, **{k.lower(): v for k, v in self.headers.items()}})
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv = ImageServer(f"http://127.0.0.1:{httpd.server_address[1]}", root)
    server_ref.append(srv)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield srv
    httpd.shutdown()


# --- The backend as users run it: `annoloop serve` in its own process ----------------------------------


@dataclass
class Backend:
    url: str
    proc: subprocess.Popen
    log: Path

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start_backend(workdir: Path, env: dict[str, str], port: int | None = None) -> Backend:
    port = port or free_port()
    log = workdir / f"backend-{port}.log"
    full_env = {k: v for k, v in os.environ.items() if k not in ("BASIC_AUTH_USER", "BASIC_AUTH_PASS")}
    full_env.update(env)
    proc = subprocess.Popen(
        [str(VENV_BIN / "annoloop"), "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=full_env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        cwd=workdir,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health", 90, proc, log)
    except RuntimeError:
        proc.kill()
        raise
    return Backend(url, proc, log)


# --- Label Studio 1.23.2, real, in its own virtual environment ---------------------------------------


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory):
    """One real Label Studio per session. Migrations take about a minute; the migrated empty database is
    cached next to the test models so later sessions start in seconds."""
    from annoloop.labelstudio_server import label_studio_version, start_label_studio

    venv = REPO / ".ls-venv"
    template = None
    if venv.exists():
        template = (
            MODEL_CACHE.parent / "labelstudio" / f"label-studio-{label_studio_version(venv)}-migrated.sqlite3"
        )
        template.parent.mkdir(parents=True, exist_ok=True)
    with start_label_studio(venv, tmp_path_factory.mktemp("labelstudio"), db_template=template) as server:
        yield server


# --- The whole loop: a shapes project in Label Studio, the backend and a worker --------------------------

SHAPES_CONFIG = """<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">
<Label value="circle"/><Label value="square"/><Label value="triangle"/></RectangleLabels></View>"""
SHAPE_LABELS = ("circle", "square", "triangle")
SCENE_W, SCENE_H = 320, 240


def gt_result(shapes: list[Shape]) -> list[dict]:
    """Ground-truth shapes as a Label Studio annotation result (what an annotator would submit)."""
    out = []
    for i, s in enumerate(shapes):
        x0, y0, x1, y1 = s.box
        value = {
            "x": 100 * x0 / SCENE_W,
            "y": 100 * y0 / SCENE_H,
            "width": 100 * (x1 - x0) / SCENE_W,
            "height": 100 * (y1 - y0) / SCENE_H,
            "rotation": 0,
            "rectanglelabels": [SHAPE_LABELS[s.cls]],
        }
        out.append(
            {
                "id": f"gt{i}",
                "from_name": "label",
                "to_name": "image",
                "type": "rectanglelabels",
                "original_width": SCENE_W,
                "original_height": SCENE_H,
                "image_rotation": 0,
                "value": value,
            }
        )
    return out


def shapes_project(
    ls, folder: str, n: int, seed: int, title: str
) -> tuple[int, list[int], list[list[Shape]]]:
    """A Label Studio project of ``n`` generated scenes served as local files: (project, task ids, shapes)."""
    root = ls.files_root / folder
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shapes = []
    for i in range(n):
        rgb, s = render_scene(rng, SCENE_W, SCENE_H, max_shapes=3)
        Image.fromarray(rgb).save(root / f"{i}.png")
        shapes.append(s)
    project = ls.create_project(title, SHAPES_CONFIG)
    ls.add_local_storage(project, folder)
    ids = ls.import_tasks(project, [{"image": ls.local_file_url(f"{folder}/{i}.png")} for i in range(n)])
    return project, ids, shapes


@dataclass
class Loop:
    """`annoloop serve` and `annoloop worker` sharing one configuration, as deployed."""

    backend: Backend
    worker: subprocess.Popen
    worker_log: Path
    model_dir: Path

    def stop(self) -> None:
        self.worker.terminate()
        self.worker.wait(30)
        self.backend.stop()


def start_loop(workdir: Path, ls, redis_url: str, starter: Path, **training) -> Loop:
    """Backend + worker on a model dir whose default model is ``starter``; tiny training settings that always
    promote (the loop's mechanics are under test, not the model's quality), overridden by ``training``."""
    import yaml

    model_dir = workdir / "models"
    publish(model_dir, starter, "starter")
    config = workdir / "annoloop.yaml"
    tiny = {
        "imgsz": 128,
        "batch": 8,
        "workers": 0,
        "min_improvement": -1.0,
        "train_args": {"nbs": 8, "close_mosaic": 1},
    }
    config.write_text(yaml.safe_dump({"log_level": "WARNING", "training": {**tiny, **training}}))
    env = {
        "MODEL_DIR": str(model_dir),
        "REDIS_URL": redis_url,
        "LABEL_STUDIO_URL": ls.url,
        "LABEL_STUDIO_API_KEY": ls.token,
        "ANNOLOOP_CONFIG": str(config),
    }
    backend = start_backend(workdir, env)
    log = workdir / "worker.log"
    worker = subprocess.Popen(
        [str(VENV_BIN / "annoloop"), "worker"],
        env={**os.environ, **env},
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    return Loop(backend, worker, log, model_dir)
