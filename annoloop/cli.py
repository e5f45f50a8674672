"""The ``annoloop`` command line: one subcommand per admin task, each a thin layer over a module."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from config.settings import ConfigError, Settings, load_settings


def _settings() -> Settings:
    try:
        return load_settings()
    except ConfigError as e:
        print(f"annoloop: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_serve(args: argparse.Namespace) -> int:
    from annoloop.logs import configure_logging
    from ml_backend.serve import serve

    settings = _settings()
    configure_logging(settings.log_level)
    serve(settings, args.host or settings.server.host, args.port or settings.server.port)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    settings = _settings()
    print(json.dumps(settings.model_dump(mode="json"), indent=2))  # SecretStr dumps as '**********'
    return 0


def cmd_starter_model(args: argparse.Namespace) -> int:
    """Train the small generated-shapes model (cached) and publish it as the default model."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from annoloop.model_store import DEFAULT_PROJECT, ModelStore
    from training.bootstrap import DEMO_RECIPE, cached_starter_model

    settings = _settings()
    store = ModelStore(settings.model_dir)
    recipe = dict(DEMO_RECIPE)
    task = recipe.pop("task", "detect")
    print(
        f"starter model: {task} on generated shapes {recipe} (trained once, then cached in {args.cache_dir})"
    )
    weights = cached_starter_model(task, Path(args.cache_dir), **recipe)
    version = "starter-" + weights.stem.rsplit("-", 1)[-1][:8]
    current = store.current(DEFAULT_PROJECT)
    if current is not None and current.version == version:
        print(f"default model {version} is already served from {current.path}")
        return 0
    if store.version(DEFAULT_PROJECT, version).weights.is_file():
        mv = store.set_current(DEFAULT_PROJECT, version)
    else:
        mv = store.publish(
            DEFAULT_PROJECT, version, weights, {"source": "starter", "task": task, "recipe": recipe}
        )
    print(f"published {mv.version} as the default model: {mv.weights}")
    return 0


def cmd_sample_images(args: argparse.Namespace) -> int:
    """Write generated scenes (the starter model's world) to import into Label Studio."""
    import numpy as np
    from PIL import Image

    from training.synthetic import render_scene

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    for i in range(args.count):
        rgb, _ = render_scene(rng, 640, 480, max_shapes=4)
        Image.fromarray(rgb).save(out / f"shapes-{i:04d}.jpg", quality=92)
    print(f"wrote {args.count} images to {out}/")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="annoloop", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the ML backend that Label Studio connects to")
    s.add_argument("--host", default=None, help="interface to listen on (default: server.host, 127.0.0.1)")
    s.add_argument("--port", type=int, default=None, help="port (default: server.port, 9090)")
    s.set_defaults(func=cmd_serve)

    c = sub.add_parser("config", help="print the effective configuration (secrets masked)")
    c.set_defaults(func=cmd_config)

    m = sub.add_parser(
        "starter-model", help="train a small model on generated shapes and serve it by default"
    )
    m.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "annoloop" / "models"))
    m.set_defaults(func=cmd_starter_model)

    g = sub.add_parser("sample-images", help="write generated shape images to try the starter model on")
    g.add_argument("--out", default="demo-images")
    g.add_argument("--count", type=int, default=20)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=cmd_sample_images)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
