"""What does serving cost on top of the model? Model's own batched predict vs. a /predict request.

Both sides see the same JPEG images: the model call gets them decoded in memory (ultralytics' own
``YOLO.predict`` on a list of arrays), the server gets their URLs and downloads, decodes, predicts, computes
uncertainty and answers JSON, as it does for Label Studio. Prints a table of medians and the ratio.

    .venv/bin/python bench/predict_overhead.py [--repeats 15] [--batches 1 8 16] [--imgsz 640]
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import requests
import torch
from PIL import Image

from annoloop.model_store import ModelStore
from tests.conftest import free_port, wait_http
from training.bootstrap import TEST_RECIPES, cached_starter_model
from training.synthetic import render_scene

CONFIG = """<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">
<Label value="circle"/><Label value="square"/><Label value="triangle"/></RectangleLabels></View>"""


def paired_medians(a, b, repeats: int) -> tuple[float, float]:
    """Median ms of a() and b(), measured alternately so machine noise and drift hit both alike."""
    a(), b()  # warm-up
    ta, tb = [], []
    for _ in range(repeats):
        for fn, out in ((a, ta), (b, tb)):
            t = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t) * 1000)
    return statistics.median(ta), statistics.median(tb)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16])
    ap.add_argument("--imgsz", type=int, default=640, help="inference size for both sides")
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=480)
    args = ap.parse_args()

    cache = Path.home() / ".cache" / "annoloop" / "test-models"
    weights = cached_starter_model("detect", cache, **TEST_RECIPES["detect"])
    work = Path(tempfile.mkdtemp(prefix="bench-predict-"))
    images_dir = work / "images"
    images_dir.mkdir()
    rng = np.random.default_rng(0)
    n = max(args.batches)
    names, arrays = [], []
    for i in range(n):
        rgb, _ = render_scene(rng, args.width, args.height, max_shapes=3)
        Image.fromarray(rgb).save(images_dir / f"{i}.jpg", quality=90)
        names.append(f"{i}.jpg")
        arrays.append(
            np.ascontiguousarray(np.asarray(Image.open(images_dir / f"{i}.jpg").convert("RGB"))[..., ::-1])
        )

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(images_dir))
    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    files_url = f"http://127.0.0.1:{files.server_address[1]}"

    model_dir = work / "models"
    ModelStore(model_dir).publish("default", "bench", weights, {})
    override = work / "bench.yaml"
    override.write_text(f"inference:\n  imgsz: {args.imgsz}\nlog_level: WARNING\n")
    port = free_port()
    env = {
        **os.environ,
        "MODEL_DIR": str(model_dir),
        "ANNOLOOP_CONFIG": str(override),
        "LABEL_STUDIO_URL": files_url,
        "LABEL_STUDIO_API_KEY": "bench-token",
    }
    log = work / "server.log"
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "annoloop"), "serve", "--port", str(port)],
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/health", 120, server, log)

        from ultralytics import YOLO

        model = YOLO(str(weights))
        rows = []
        for b in args.batches:
            batch = arrays[:b]
            tasks = [{"id": i, "data": {"image": "/" + name}} for i, name in enumerate(names[:b])]
            body = {"tasks": tasks, "label_config": CONFIG, "project": "1.0"}

            def own(batch=batch):
                model.predict(batch, imgsz=args.imgsz, conf=0.05, verbose=False)

            def served(body=body):
                r = requests.post(url + "/predict", json=body, timeout=300)
                r.raise_for_status()

            m, s = paired_medians(own, served, args.repeats)
            rows.append((b, m, s))
    finally:
        server.terminate()
        server.wait(10)
        files.shutdown()

    print(
        f"\npredict overhead: {args.width}x{args.height} JPEG, imgsz {args.imgsz}, median of {args.repeats}"
    )
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__},"
        f" device {'cuda' if torch.cuda.is_available() else 'cpu'}"
    )
    print(
        f"| {'batch':>5} | {'model.predict ms':>16} | {'/predict ms':>11} | {'overhead ms':>11} | {'ratio':>5} |"
    )
    print(f"|{'-' * 7}|{'-' * 18}|{'-' * 13}|{'-' * 13}|{'-' * 7}|")
    for b, m, s in rows:
        print(f"| {b:>5} | {m:>16.1f} | {s:>11.1f} | {s - m:>11.1f} | {s / m:>5.2f} |")


if __name__ == "__main__":
    main()
