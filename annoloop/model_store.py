"""On-disk model versions and the per-project pointer to the one being served.

Layout: ``MODEL_DIR/<project>/<version>/model.pt`` (+ ``metadata.json``) and ``MODEL_DIR/<project>/current``,
a one-line file naming the served version. Projects without their own model are served
``MODEL_DIR/default/``. The pointer is replaced atomically (write + ``os.replace``), so readers see either
the old or the new version, never a half-written one; a version folder is complete before it is pointed at.
A trained candidate that was not promoted keeps only its model card, in
``MODEL_DIR/<project>/rejected/<version>/metadata.json``, written the same all-or-nothing way.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_PROJECT = "default"
WEIGHTS_NAME = "model.pt"
METADATA_NAME = "metadata.json"
POINTER_NAME = "current"
REJECTED_DIR = "rejected"
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


def _fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (a crash right after must not undo it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so readers see the old or the new file, never a part (fsynced)."""
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
    _fsync_dir(path.parent)


def _write_folder(target: Path, files: dict[str, bytes]) -> None:
    """Create ``target`` holding ``files`` (name -> bytes), all or nothing.

    Why: a version folder (or a rejected card) may be read by another process at any moment and a training
    may be killed at any moment, so nothing may ever appear under its final name half-written. The files are
    written and fsynced in a hidden temporary folder beside ``target`` (same file system), which is then
    renamed into place in one step; on any failure the temporary folder is removed. Hidden names
    (``.<name>.*``) are not valid version names, so listings never see them.
    """
    if target.exists():
        raise ModelStoreError(f"{target} already exists")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        for name, data in files.items():
            with open(tmp / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(target.parent)


def _card_bytes(metadata: dict[str, Any]) -> bytes:
    return json.dumps(metadata, indent=2, default=str).encode()


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
        atomic_write_text(self.pointer(project), version + "\n")
        return mv

    def publish(self, project: str, version: str, weights: Path, metadata: dict[str, Any]) -> ModelVersion:
        """Write a complete version folder under a temporary name, rename it into place, then move the pointer."""
        mv = self.version(project, version)
        if mv.path.exists():
            raise ModelStoreError(f"version {version!r} of project {project!r} already exists")
        _write_folder(
            mv.path, {WEIGHTS_NAME: Path(weights).read_bytes(), METADATA_NAME: _card_bytes(metadata)}
        )
        return self.set_current(project, version)

    def record_rejected(self, project: str, version: str, metadata: dict[str, Any]) -> ModelVersion:
        """Keep the model card of a candidate that was not promoted: ``<project>/rejected/<version>/``.

        No weights (a rejected candidate is never served, and weights are most of a version's size), and the
        pointer does not move. Written all or nothing like :meth:`publish`. Returns where the card lies
        (``.metadata()`` reads it back; ``.weights`` does not exist).
        """
        _check_name("project", project)
        mv = ModelVersion(
            project, version, self.root / project / REJECTED_DIR / _check_name("version", version)
        )
        if mv.path.exists():
            raise ModelStoreError(f"rejected version {version!r} of project {project!r} already exists")
        _write_folder(mv.path, {METADATA_NAME: _card_bytes(metadata)})
        return mv

    def rejected(self, project: str) -> list[ModelVersion]:
        """Cards of the project's rejected candidates, oldest first (version names sort by age)."""
        folder = self.root / _check_name("project", project) / REJECTED_DIR
        if not folder.is_dir():
            return []
        return sorted(
            (
                ModelVersion(project, p.name, p)
                for p in folder.iterdir()
                if p.is_dir() and _SAFE_NAME.match(p.name) and (p / METADATA_NAME).is_file()
            ),
            key=lambda v: v.version,
        )
