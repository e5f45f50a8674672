"""On-disk model versions and the per-project pointer to the one being served.

Layout: ``MODEL_DIR/<project>/<version>/model.pt`` (+ ``metadata.json``) and ``MODEL_DIR/<project>/current``,
a one-line file naming the served version. Projects without their own model are served
``MODEL_DIR/default/``. The pointer is replaced atomically (write + ``os.replace``), so readers see either
the old or the new version, never a half-written one; a version folder is complete before it is pointed at.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_PROJECT = "default"
WEIGHTS_NAME = "model.pt"
METADATA_NAME = "metadata.json"
POINTER_NAME = "current"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ModelStoreError(RuntimeError):
    pass


@dataclass(frozen=True)
class ModelVersion:
    project: str
    version: str
    path: Path

    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS_NAME

    def metadata(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / METADATA_NAME).read_text())
        except (OSError, ValueError):
            return {}


def _check_name(kind: str, name: str) -> str:
    if not _SAFE_NAME.match(name):
        raise ModelStoreError(f"invalid {kind} name {name!r}: use letters, digits, '.', '_' and '-'")
    return name


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ModelStore:
    def __init__(self, root: Path):
        self.root = Path(root)

    def pointer(self, project: str) -> Path:
        return self.root / _check_name("project", project) / POINTER_NAME

    def version(self, project: str, version: str) -> ModelVersion:
        return ModelVersion(
            project, version, self.root / _check_name("project", project) / _check_name("version", version)
        )

    def current(self, project: str) -> ModelVersion | None:
        """The version the project's pointer names, if its weights exist."""
        try:
            name = self.pointer(project).read_text().strip()
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not name:
            return None
        mv = self.version(project, name)
        return mv if mv.weights.is_file() else None

    def served(self, project: str) -> ModelVersion | None:
        """What a project is served: its own current version, else the default one."""
        return self.current(project) or (
            self.current(DEFAULT_PROJECT) if project != DEFAULT_PROJECT else None
        )

    def pointer_stamp(self, project: str) -> tuple[int, int] | None:
        """A cheap change marker (inode, mtime) of the project's and the default pointer, for polling."""
        stamps = []
        for p in (project, DEFAULT_PROJECT):
            try:
                st = self.pointer(p).stat()
                stamps.append((st.st_ino, st.st_mtime_ns))
            except OSError:
                stamps.append((0, 0))
        return tuple(stamps)  # type: ignore[return-value]

    def projects(self) -> list[str]:
        """Projects that have a version pointer (the default one included)."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir() if _SAFE_NAME.match(p.name) and (p / POINTER_NAME).is_file()
        )

    def versions(self, project: str) -> list[ModelVersion]:
        folder = self.root / _check_name("project", project)
        if not folder.is_dir():
            return []
        found = [
            self.version(project, p.name) for p in folder.iterdir() if p.is_dir() and _SAFE_NAME.match(p.name)
        ]
        return sorted((v for v in found if v.weights.is_file()), key=lambda v: v.weights.stat().st_mtime)

    def set_current(self, project: str, version: str) -> ModelVersion:
        mv = self.version(project, version)
        if not mv.weights.is_file():
            raise ModelStoreError(f"version {version!r} of project {project!r} has no {WEIGHTS_NAME}")
        _atomic_write(self.pointer(project), version + "\n")
        return mv

    def publish(self, project: str, version: str, weights: Path, metadata: dict[str, Any]) -> ModelVersion:
        """Write a complete version folder under a temporary name, rename it into place, then move the pointer."""
        mv = self.version(project, version)
        if mv.path.exists():
            raise ModelStoreError(f"version {version!r} of project {project!r} already exists")
        mv.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=mv.path.parent, prefix=f".{version}."))
        try:
            data = Path(weights).read_bytes()
            (tmp / WEIGHTS_NAME).write_bytes(data)
            (tmp / METADATA_NAME).write_text(json.dumps(metadata, indent=2, default=str))
            os.rename(tmp, mv.path)
        except BaseException:
            for f in tmp.glob("*"):
                f.unlink()
            tmp.rmdir()
            raise
        return self.set_current(project, version)
