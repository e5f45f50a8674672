"""How `annoloop sync` scales: a project of thousands of small-image tasks in a real Label Studio server.

Real parts: Label Studio 1.23.2 (.ls-venv, started from the migrated-database template), the cached tiny
detect starter model served as the default model of a fresh MODEL_DIR, and each sync in a process of its own,
as `annoloop sync --project ID --quiet` runs it (same settings from the environment, same logging), so that
its peak memory (ru_maxrss) is that process's own. Every task points at its own small PNG (distinct image
URLs, so nothing is shared through the score cache), served by Label Studio as local files.

For each size: a full sync of a fresh project (every task scored by the model, predictions imported), then a
re-sync with nothing new (every task from the score cache, nothing written). Reports tasks per second, peak
RSS, and Label Studio API calls, which should grow with pages (``sync.page_size``) and import chunks
(``sync.import_chunk``), not with tasks. Results also go to ``--out`` as JSON.

    .venv/bin/python bench/sync_scale.py [--sizes 2500,10000] [--quick] [--page-size 500] [--out FILE]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from io import BytesIO
from pathlib import Path
from typing import Any

os.environ.setdefault("YOLO_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import yaml
from PIL import Image

from annoloop.labelstudio_server import label_studio_version, start_label_studio
from config.settings import load_settings
from tests.conftest import MODEL_CACHE, SHAPES_CONFIG, publish
from training.bootstrap import TEST_RECIPES, cached_starter_model
from training.synthetic import render_scene

ROOT = Path(__file__).resolve().parents[1]
FOLDER = "scale"  # under Label Studio's files root; one PNG per task, shared by the projects of all sizes

#: The sync process: what `annoloop sync --project ID --quiet` does (settings from the environment, logging),
#: but it prints the summary and its peak RSS as one JSON line. torch and ultralytics are imported before the
#: baseline RSS is read, so "growth" is what the sync itself holds, not the libraries.
CHILD = r"""
import json, os, resource, sys, time
t0 = time.perf_counter()
os.environ.setdefault("YOLO_OFFLINE", "1")
import torch, ultralytics  # noqa
from annoloop.logs import configure_logging
from config.settings import load_settings
from sync.job import sync_project
settings = load_settings()
configure_logging(settings.log_level)
base_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t1 = time.perf_counter()
summary = sync_project(sys.argv[1], settings)
t2 = time.perf_counter()
out = {
    "summary": summary.to_dict(),
    "baseline_rss_kib": base_kib,
    "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    "startup_s": t1 - t0,
    "sync_wall_s": t2 - t1,
}
print("SYNC-RESULT " + json.dumps(out), flush=True)
"""


def write_images(root: Path, n: int, distinct: int, width: int, height: int) -> float:
    """``n`` PNG files 0.png .. n-1.png; ``distinct`` rendered scenes, each file holding one of them."""
    started = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(min(distinct, n)):
        rgb, _shapes = render_scene(rng, width, height, max_shapes=3)
        buf = BytesIO()
        Image.fromarray(rgb).save(buf, format="PNG")
        blobs.append(buf.getvalue())
    for i in range(n):
        (root / f"{i}.png").write_bytes(blobs[i % len(blobs)])
    return time.perf_counter() - started


def run_sync(project: int, env: dict[str, str], log: Path) -> dict[str, Any]:
    """One sync in its own process; its JSON result plus the process's wall time."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(project)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    wall = time.perf_counter() - started
    with log.open("a") as fh:
        fh.write(f"=== sync project {project}: rc {done.returncode}\n{done.stdout}\n{done.stderr}\n")
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("SYNC-RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(
            f"sync of project {project} failed (rc {done.returncode}):\n{done.stderr[-4000:]}{done.stdout[-2000:]}"
        )
    result = json.loads(lines[-1].removeprefix("SYNC-RESULT "))
    result["process_wall_s"] = wall
    return result


def condensed(result: dict[str, Any]) -> dict[str, Any]:
    """What the JSON file keeps of one sync: no per-task detail (top, failed reasons)."""
    s = result["summary"]
    keep = (
        "model_version",
        "sync_version",
        "labeled",
        "pool",
        "scored",
        "from_cache",
        "written",
        "unchanged",
        "deleted_versions",
        "api_calls",
        "seconds",
    )
    return {
        **{k: s[k] for k in keep},
        "failed": len(s["failed"]),
        "failed_examples": dict(list(s["failed"].items())[:3]),
        "baseline_rss_mib": round(result["baseline_rss_kib"] / 1024, 1),
        "peak_rss_mib": round(result["peak_rss_kib"] / 1024, 1),
        "startup_s": round(result["startup_s"], 2),
        "sync_wall_s": round(result["sync_wall_s"], 2),
        "process_wall_s": round(result["process_wall_s"], 2),
    }


def check(size: int, full: dict[str, Any], again: dict[str, Any]) -> list[str]:
    """What the numbers must show for the benchmark to mean anything (reported, not asserted)."""
    odd = []
    if full["pool"] != size or full["scored"] != size or full["failed"]:
        odd.append(
            f"size {size}: full sync pool {full['pool']}, scored {full['scored']}, failed {full['failed']} "
            f"{full['failed_examples']}"
        )
    if full["written"] != size:
        odd.append(f"size {size}: full sync wrote {full['written']} predictions, not {size}")
    if again["scored"] != 0 or again["from_cache"] != size or not again["unchanged"] or again["written"]:
        odd.append(
            f"size {size}: re-sync scored {again['scored']}, from cache {again['from_cache']}, "
            f"unchanged {again['unchanged']}, wrote {again['written']}"
        )
    return odd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="2500,10000", help="comma-separated project sizes (tasks)")
    ap.add_argument("--quick", action="store_true", help="smoke run: sizes 200,800")
    ap.add_argument("--distinct", type=int, default=400, help="distinct rendered scenes behind the files")
    ap.add_argument("--width", type=int, default=96)
    ap.add_argument("--height", type=int, default=72)
    ap.add_argument("--import-chunk-tasks", type=int, default=2000, help="tasks per Label Studio import")
    ap.add_argument("--page-size", type=int, default=None, help="sync.page_size (default: the config's)")
    ap.add_argument("--batch-size", type=int, default=None, help="sync.batch_size (default: the config's)")
    ap.add_argument("--import-chunk", type=int, default=None, help="sync.import_chunk (default: config's)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sync_scale.json")
    args = ap.parse_args()
    sizes = [200, 800] if args.quick else [int(s) for s in args.sizes.split(",") if s.strip()]

    work = Path(tempfile.mkdtemp(prefix="bench-sync-scale-"))
    venv = ROOT / ".ls-venv"
    template = (
        MODEL_CACHE.parent / "labelstudio" / f"label-studio-{label_studio_version(venv)}-migrated.sqlite3"
    )
    template.parent.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    try:
        weights = cached_starter_model("detect", MODEL_CACHE, **TEST_RECIPES["detect"])
        model_dir = work / "models"
        publish(model_dir, weights, "starter")
        overrides = {
            k: v
            for k, v in (
                ("page_size", args.page_size),
                ("batch_size", args.batch_size),
                ("import_chunk", args.import_chunk),
            )
            if v is not None
        }
        with start_label_studio(venv, work / "ls", db_template=template) as ls:
            env = {k: v for k, v in os.environ.items() if k != "ANNOLOOP_CONFIG"}
            env.update(
                LABEL_STUDIO_URL=ls.url,
                LABEL_STUDIO_API_KEY=ls.token,
                MODEL_DIR=str(model_dir),
                YOLO_OFFLINE="1",
                LOG_LEVEL="WARNING",
            )
            if overrides:
                config = work / "annoloop.yaml"
                config.write_text(yaml.safe_dump({"sync": overrides}))
                env["ANNOLOOP_CONFIG"] = str(config)
            settings = load_settings(env=env)
            print(
                f"Label Studio {label_studio_version(venv)} up in {ls.startup_seconds:.1f} s; "
                f"sync settings: page_size {settings.sync.page_size}, batch_size {settings.sync.batch_size}, "
                f"import_chunk {settings.sync.import_chunk}",
                flush=True,
            )
            secs = write_images(ls.files_root / FOLDER, max(sizes), args.distinct, args.width, args.height)
            print(f"wrote {max(sizes)} PNGs ({args.width}x{args.height}) in {secs:.1f} s", flush=True)
            for size in sizes:
                project = ls.create_project(f"sync scale {size}", SHAPES_CONFIG)
                ls.add_local_storage(project, FOLDER)
                started = time.perf_counter()
                for start in range(0, size, args.import_chunk_tasks):
                    ls.import_tasks(
                        project,
                        [
                            {"image": ls.local_file_url(f"{FOLDER}/{i}.png")}
                            for i in range(start, min(start + args.import_chunk_tasks, size))
                        ],
                    )
                import_s = time.perf_counter() - started
                print(f"size {size}: project {project}, tasks imported in {import_s:.1f} s", flush=True)
                full = condensed(run_sync(project, env, work / "sync.log"))
                print(
                    f"size {size}: full sync {full['seconds']['total']:.1f} s {full['seconds']}", flush=True
                )
                again = condensed(run_sync(project, env, work / "sync.log"))
                print(
                    f"size {size}: re-sync {again['seconds']['total']:.1f} s {again['seconds']}", flush=True
                )
                runs.append(
                    {
                        "size": size,
                        "project": project,
                        "import_tasks_s": round(import_s, 2),
                        "pages": math.ceil(size / settings.sync.page_size),
                        "import_chunks": math.ceil(size / settings.sync.import_chunk),
                        "full": full,
                        "resync": again,
                    }
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"device {device}"
    )
    sync_settings = {
        "page_size": settings.sync.page_size,
        "batch_size": settings.sync.batch_size,
        "import_chunk": settings.sync.import_chunk,
    }
    print(
        f"\nsync scale: {args.width}x{args.height} PNG tasks, tiny detect starter model "
        f"(imgsz {TEST_RECIPES['detect']['imgsz']}), Label Studio {label_studio_version(venv)}"
    )
    print(f"machine: {machine}")
    print(
        f"sync settings: page_size {sync_settings['page_size']}, batch_size {sync_settings['batch_size']}, "
        f"import_chunk {sync_settings['import_chunk']}"
    )
    columns = [
        "tasks",
        "full s",
        "tasks/s",
        "re-sync s",
        "tasks/s",
        "RSS full MiB",
        "RSS re-sync MiB",
        "API full",
        "API re-sync",
        "pages",
        "calls/page full",
        "calls/page re-sync",
    ]
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("-" * (len(c) + 2) for c in columns) + "|")
    for r in runs:
        f, a, n, p = r["full"], r["resync"], r["size"], r["pages"]
        tf, ta = f["seconds"]["total"], a["seconds"]["total"]
        cells = [
            n,
            f"{tf:.1f}",
            f"{n / tf:.1f}",
            f"{ta:.1f}",
            f"{n / ta:.1f}",
            f"{f['peak_rss_mib']:.0f}",
            f"{a['peak_rss_mib']:.0f}",
            f["api_calls"],
            a["api_calls"],
            p,
            f"{f['api_calls'] / p:.2f}",
            f"{a['api_calls'] / p:.2f}",
        ]
        print("| " + " | ".join(f"{c:>{len(h)}}" for c, h in zip(cells, columns, strict=True)) + " |")
    print("\nwhere the time goes (s; setup = Label Studio project + model load, score = paging + inference):")
    for r in runs:
        for kind in ("full", "resync"):
            x = r[kind]
            print(
                f"  {r['size']:>6} {kind:<6} {x['seconds']}  process {x['process_wall_s']:.1f} s "
                f"(start-up {x['startup_s']:.1f}), RSS baseline {x['baseline_rss_mib']:.0f} MiB -> peak "
                f"{x['peak_rss_mib']:.0f} MiB (+{x['peak_rss_mib'] - x['baseline_rss_mib']:.0f})"
            )
    ratios = []

    def x(num: float, den: float) -> float:
        return round(num / den, 2) if den else float("nan")

    def growth(run: dict[str, Any]) -> float:
        return run["peak_rss_mib"] - run["baseline_rss_mib"]

    for a, b in itertools.pairwise(runs):
        fa, fb, ra, rb = a["full"], b["full"], a["resync"], b["resync"]
        ratio = {
            "from": a["size"],
            "to": b["size"],
            "tasks": x(b["size"], a["size"]),
            "api_calls_full": x(fb["api_calls"], fa["api_calls"]),
            "api_calls_resync": x(rb["api_calls"], ra["api_calls"]),
            "peak_rss_full": x(fb["peak_rss_mib"], fa["peak_rss_mib"]),
            "peak_rss_resync": x(rb["peak_rss_mib"], ra["peak_rss_mib"]),
            "rss_growth_full": x(growth(fb), growth(fa)),
            "rss_growth_resync": x(growth(rb), growth(ra)),
            "time_full": x(fb["seconds"]["total"], fa["seconds"]["total"]),
            "time_resync": x(rb["seconds"]["total"], ra["seconds"]["total"]),
        }
        ratios.append(ratio)
        print(
            f"\n{a['size']} -> {b['size']} tasks (x{ratio['tasks']}): API calls x{ratio['api_calls_full']} full, "
            f"x{ratio['api_calls_resync']} re-sync; peak RSS x{ratio['peak_rss_full']} full, "
            f"x{ratio['peak_rss_resync']} re-sync (growth over baseline x{ratio['rss_growth_full']}, "
            f"x{ratio['rss_growth_resync']}); time x{ratio['time_full']} full, x{ratio['time_resync']} re-sync"
        )
    odd = [msg for r in runs for msg in check(r["size"], r["full"], r["resync"])]
    for msg in odd:
        print(f"ODD: {msg}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "benchmark": "sync_scale",
                "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "machine": machine,
                "label_studio": label_studio_version(venv),
                "image": f"{args.width}x{args.height} PNG",
                "model": {"recipe": "detect", **TEST_RECIPES["detect"]},
                "sync_settings": sync_settings,
                "runs": runs,
                "ratios": ratios,
                "odd": odd,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nresults: {args.out}")


if __name__ == "__main__":
    main()
