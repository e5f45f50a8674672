"""Start a real Label Studio 1.23.2 server (for the tests and `make demo`), and talk to its REST API.

Why a real server instead of mocks: the ML-backend protocol (what Label Studio sends to
``/health``, ``/setup``, ``/predict`` and ``/webhook``, and what it stores from the answers) is
only defined by Label Studio's code, so tests that matter must run against it.

The server lives in its own virtual environment (``.ls-venv``, created by ``make install``)
because it pins Django and many other packages that would clash with the project's.

Usage from a session-scoped pytest fixture::

    with start_label_studio(ROOT / ".ls-venv", tmp_path_factory.mktemp("ls")) as ls:
        project = ls.create_project("demo", RECT_CONFIG)
        ...

Secrets (the API token and the admin password) are generated per server, passed through the
environment rather than argv (so they do not show in ``ps``), and kept out of ``repr`` so that
pytest assertion output and logs never show them.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests

#: First start runs ~200 Django migrations on SQLite; on a 2-core machine that takes about a minute.
DEFAULT_START_TIMEOUT_S = 240.0
#: Every API call is local; anything slower than this is a hang worth failing on.
#: Prediction requests are synchronous in Label Studio (it waits for the backend's /predict,
#: up to 100 s by default), so those calls pass a longer timeout.
API_TIMEOUT_S = 30.0
PREDICT_API_TIMEOUT_S = 150.0

#: Environment variables passed through to the server. Label Studio reads many bare names
#: (HOST, PORT, DEBUG, USERNAME, PASSWORD, LOG_LEVEL, ...) via ``get_env``, so inheriting the
#: caller's whole environment would make tests depend on whatever the developer has exported.
_PASSTHROUGH_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "TZ", "SYSTEMROOT")

#: RectangleLabels config usable by tests that do not care about the exact labels.
RECTANGLE_LABEL_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="label" toName="image">
    <Label value="cat"/>
    <Label value="dog"/>
  </RectangleLabels>
</View>"""


class LabelStudioError(RuntimeError):
    """Raised when the test server cannot be started or an API call fails."""


def _free_port(host: str = "127.0.0.1") -> int:
    """Ask the OS for a free TCP port (there is a small race until Label Studio binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, max_lines: int = 60) -> str:
    """Last lines of the server log, for error messages that explain why the start failed."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        return f"<could not read {path}: {exc}>"
    return "\n".join(lines[-max_lines:])


@dataclass
class LabelStudioServer:
    """A running Label Studio server plus a small REST client for the test side.

    The client deliberately uses plain ``requests`` against the documented endpoints instead
    of the SDK, so tests see exactly the HTTP behaviour the ML backend will face.
    """

    url: str
    token: str = field(repr=False)
    username: str
    password: str = field(repr=False)
    data_dir: Path
    files_root: Path
    log_path: Path | None = None
    #: Seconds from the launch call (including a database template build, if one was needed)
    #: to the first ``GET /health`` answered with 200.
    startup_seconds: float | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    #: The server's environment (paths, flags), for ``label-studio`` CLI calls on the same data dir.
    env: dict[str, str] = field(default_factory=dict, repr=False)
    _session: requests.Session = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")
        self._session = requests.Session()
        self._session.headers["Authorization"] = f"Token {self.token}"

    # ------------------------------------------------------------------ low level
    def api(
        self,
        method: str,
        path: str,
        *,
        expected: tuple[int, ...] = (200, 201, 204),
        timeout: float = API_TIMEOUT_S,
        **kwargs: Any,
    ) -> requests.Response:
        """Call ``<url><path>`` with the token; raise with the response body if the status is unexpected.

        Raising here (instead of returning the response) keeps test failures readable: the
        message says which call failed and what Label Studio answered.
        """
        response = self._session.request(method, f"{self.url}{path}", timeout=timeout, **kwargs)
        if response.status_code not in expected:
            raise LabelStudioError(f"{method} {path} -> HTTP {response.status_code}: {response.text[:2000]}")
        return response

    # ------------------------------------------------------------------ projects and tasks
    def create_project(self, title: str, label_config: str, **extra: Any) -> int:
        """Create a project (titles need at least 3 characters) and return its id."""
        body = {"title": title, "label_config": label_config, **extra}
        return int(self.api("POST", "/api/projects", json=body).json()["id"])

    def project(self, project: int) -> dict[str, Any]:
        """The project as the API returns it (``model_version``, ``show_collab_predictions``, ...)."""
        return dict(self.api("GET", f"/api/projects/{project}").json())

    def import_tasks(self, project: int, tasks: list[dict[str, Any]]) -> list[int]:
        """Import tasks (``{"data": {...}}`` or flat data dicts) and return the new ids in input order.

        ``return_task_ids=true`` makes the synchronous (Community edition) import answer with
        the ids of the created tasks, in the order they were given.
        """
        response = self.api(
            "POST", f"/api/projects/{project}/import", params={"return_task_ids": "true"}, json=tasks
        ).json()
        ids = [int(task_id) for task_id in response.get("task_ids", [])]
        if len(ids) != len(tasks):
            raise LabelStudioError(f"imported {len(tasks)} tasks but got ids {ids}: {response}")
        return ids

    def upload_file(self, project: int, path: Path) -> tuple[list[int], dict[str, Any]]:
        """Upload one file through ``POST /api/projects/{id}/import``; return (task ids, raw answer).

        Label Studio stores the file under ``<data_dir>/media/upload/<project>/`` and creates a
        task whose data value is ``/data/upload/<project>/<prefix>-<name>``.
        """
        with path.open("rb") as fh:
            answer = self.api(
                "POST",
                f"/api/projects/{project}/import",
                params={"return_task_ids": "true"},
                files={path.name: (path.name, fh)},
            ).json()
        return [int(task_id) for task_id in answer.get("task_ids", [])], dict(answer)

    def tasks(self, project: int) -> list[dict[str, Any]]:
        """All tasks of a project through ``GET /api/tasks`` (does not trigger predictions)."""
        tasks: list[dict[str, Any]] = []
        page = 1
        while True:
            response = self.api(
                "GET",
                "/api/tasks",
                params={"project": project, "page": page, "page_size": 100},
                expected=(200, 404),
            )
            if response.status_code == 404:  # past the last page
                break
            batch = response.json().get("tasks", [])
            tasks.extend(batch)
            if len(batch) < 100:
                break
            page += 1
        return tasks

    def get_task(self, task_id: int) -> dict[str, Any]:
        """``GET /api/tasks/{id}``.

        Beware: with ``show_collab_predictions`` on (the default) and no prediction on the task,
        this call makes Label Studio ask the connected ML backend for a prediction.
        """
        return dict(self.api("GET", f"/api/tasks/{task_id}", timeout=PREDICT_API_TIMEOUT_S).json())

    # ------------------------------------------------------------------ local files
    def local_file_url(self, path_relative_to_files_root: str | Path) -> str:
        """Task data URL for a file under ``files_root``, served by Label Studio's local-files view.

        Serving only works for files inside a directory registered as local storage of a
        project the caller can see; see :meth:`add_local_storage`.
        """
        relative = Path(path_relative_to_files_root).as_posix().lstrip("/")
        return f"/data/local-files/?d={quote(relative)}"

    def add_local_storage(self, project: int, subdir: str | Path, title: str = "test files") -> int:
        """Register ``files_root/subdir`` as local-files import storage of ``project`` (no sync).

        Without this, ``/data/local-files/?d=...`` answers 404 for every file: the view only
        serves files under a storage path of a project the user has access to. The storage
        path must be a strict subdirectory of LOCAL_FILES_DOCUMENT_ROOT (the root itself is refused).
        """
        path = (self.files_root / subdir).resolve()
        body = {"project": project, "path": str(path), "title": title, "use_blob_urls": True}
        return int(self.api("POST", "/api/storages/localfiles", json=body).json()["id"])

    # ------------------------------------------------------------------ ML backend
    def connect_ml_backend(
        self,
        project: int,
        url: str,
        title: str = "annoloop",
        basic_auth: tuple[str, str] | None = None,
        **extra: Any,
    ) -> int:
        """Connect an ML backend (``POST /api/ml``) and return its id.

        Label Studio calls the backend's ``GET /health`` then ``POST /setup`` twice (validation,
        then state update) synchronously while handling this request, so the backend must
        already be up. It also registers a webhook to ``<url>/webhook`` and, only if the
        project's ``model_version`` is empty and ``show_collab_predictions`` is on, sets
        ``project.model_version`` to ``title``.
        """
        body: dict[str, Any] = {"project": project, "url": url, "title": title, **extra}
        if basic_auth is not None:
            body.update(
                auth_method="BASIC_AUTH", basic_auth_user=basic_auth[0], basic_auth_pass=basic_auth[1]
            )
        else:
            body.setdefault("auth_method", "NONE")
        return int(self.api("POST", "/api/ml", json=body, timeout=PREDICT_API_TIMEOUT_S).json()["id"])

    def ml_backends(self, project: int) -> list[dict[str, Any]]:
        """``GET /api/ml?project=ID`` (Label Studio re-checks each backend's health and setup)."""
        return list(self.api("GET", "/api/ml", params={"project": project}).json())

    def request_predictions(self, project: int, task_ids: list[int] | None = None) -> dict[str, Any]:
        """Make Label Studio ask its ML backend for predictions, as the Data Manager's
        "Retrieve Predictions" action does, and wait until they are stored.

        ``task_ids=None`` means all tasks of the project. The action runs synchronously in the
        Community edition: it calls the backend's ``/health``, ``/setup`` and then one
        ``/predict`` with every selected task that has no prediction of the current backend
        model version yet, stores the answers, and only then returns.

        The answer (``{"processed_items": N, "detail": "Retrieved N predictions"}``) counts the
        selected tasks, not stored predictions: it is the same when the backend failed.
        Check :meth:`predictions`.
        """
        if task_ids is None:
            selected: dict[str, Any] = {"all": True, "excluded": []}
        else:
            selected = {"all": False, "included": list(task_ids)}
        response = self.api(
            "POST",
            "/api/dm/actions",
            params={"id": "retrieve_tasks_predictions", "project": project},
            json={"selectedItems": selected},
            timeout=PREDICT_API_TIMEOUT_S,
        )
        return dict(response.json())

    def predictions(self, task_id: int) -> list[dict[str, Any]]:
        """Predictions stored on a task (``result``, ``score``, ``model_version``, ...).

        Uses ``GET /api/predictions?task=ID``, which, unlike ``GET /api/tasks/{id}``, never
        makes Label Studio fetch new predictions as a side effect.
        """
        return list(self.api("GET", "/api/predictions", params={"task": task_id}).json())

    def webhooks(self, project: int) -> list[dict[str, Any]]:
        """Webhooks registered for a project (connecting an ML backend adds ``<url>/webhook``)."""
        return list(self.api("GET", "/api/webhooks", params={"project": project}).json())

    # ------------------------------------------------------------------ lifecycle
    def add_user(self, email: str) -> LabelStudioServer:
        """A second user in the same organization (``label-studio init``, as an admin would), returned as a
        client with that user's legacy token; ``stop()`` on it only closes its session."""
        password = secrets.token_urlsafe(16)
        token = secrets.token_hex(20)
        env = {**self.env, "LABEL_STUDIO_USERNAME": email, "LABEL_STUDIO_PASSWORD": password}
        env["LABEL_STUDIO_USER_TOKEN"] = token
        done = subprocess.run(
            [str(self.env["_EXECUTABLE"]), "init", "--username", email],
            env=env,
            cwd=self.data_dir.parent,
            capture_output=True,
            text=True,
            timeout=180,
            stdin=subprocess.DEVNULL,
        )
        if done.returncode != 0:
            raise LabelStudioError(f"label-studio init failed: {done.stdout[-1500:]}{done.stderr[-1500:]}")
        return LabelStudioServer(
            url=self.url,
            token=token,
            username=email,
            password=password,
            data_dir=self.data_dir,
            files_root=self.files_root,
        )

    def stop(self, timeout: float = 20.0) -> None:
        """Terminate the server's whole process group (SIGTERM, then SIGKILL after ``timeout``)."""
        self._session.close()
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout)


def _wait_healthy(proc: subprocess.Popen[bytes], url: str, log_path: Path, timeout: float) -> None:
    """Poll ``/health`` until 200; fail early if the process dies, with the log tail either way."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise LabelStudioError(
                f"Label Studio exited with code {proc.returncode} before answering /health.\n"
                f"Log {log_path} (tail):\n{_tail(log_path)}"
            )
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise LabelStudioError(
                f"Label Studio did not answer {url}/health with 200 within {timeout:.0f} s.\n"
                f"Log {log_path} (tail):\n{_tail(log_path)}"
            )
        time.sleep(0.5)


def launch_label_studio(
    venv: Path,
    work_dir: Path,
    port: int | None = None,
    *,
    start_timeout: float = DEFAULT_START_TIMEOUT_S,
    log_level: str = "INFO",
    extra_env: dict[str, str] | None = None,
    db_template: Path | None = None,
    files_root: Path | None = None,
) -> LabelStudioServer:
    """Start a fresh Label Studio and return it once ``/health`` answers 200. Call ``.stop()``.

    ``work_dir`` gets ``data/`` (a fresh SQLite database, uploads), ``files/`` (the
    LOCAL_FILES_DOCUMENT_ROOT) and ``label-studio.log``. Prefer :func:`start_label_studio`,
    which also stops the server.

    ``db_template``: optional path of a cached, freshly migrated, empty database (no users, no
    projects). Migrations take about a minute on a 2-core machine while a start on a migrated
    database takes about 5 s, so test sessions can share the migrations: if the file is missing
    it is built once (``label-studio version`` migrates a scratch data dir and exits) and then
    copied into each new data dir. Key the path by Label Studio version (see
    :func:`label_studio_version`): a template from another version would be migrated again.
    """
    venv = Path(venv).resolve()
    executable = venv / "bin" / "label-studio"
    if not executable.exists():
        raise LabelStudioError(
            f"Label Studio is not installed: {executable} is missing. Run `make install` to create "
            f"the Label Studio virtual environment ({venv})."
        )
    work_dir = Path(work_dir).resolve()
    data_dir = work_dir / "data"
    # The local-files document root: ours, or a dataset's parent folder so its images are served in place.
    files_root = Path(files_root).resolve() if files_root is not None else work_dir / "files"
    if data_dir.exists() and any(data_dir.iterdir()):
        raise LabelStudioError(f"{data_dir} is not empty: each test server needs a fresh data dir")
    data_dir.mkdir(parents=True, exist_ok=True)
    files_root.mkdir(parents=True, exist_ok=True)
    log_path = work_dir / "label-studio.log"

    port = port or _free_port()
    url = f"http://127.0.0.1:{port}"
    username = "admin@example.com"
    password = secrets.token_urlsafe(16)
    token = secrets.token_hex(20)  # 40 chars: the maximum the Token model stores

    env = {key: os.environ[key] for key in _PASSTHROUGH_ENV if key in os.environ}
    env.update(
        LABEL_STUDIO_BASE_DATA_DIR=str(data_dir),
        LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED="true",
        LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=str(files_root),
        # Since 1.23.1 both default to true and refuse backends/webhooks on 127.0.0.1.
        ML_BLOCK_LOCAL_IP="false",
        SSRF_PROTECTION_ENABLED="false",
        # Legacy "Authorization: Token <key>" auth is off by default in 1.23.
        LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN="true",
        # Credentials through the environment, not argv (argv is visible in `ps`).
        LABEL_STUDIO_USERNAME=username,
        LABEL_STUDIO_PASSWORD=password,
        LABEL_STUDIO_USER_TOKEN=token,
        # No network here: skip the PyPI version check, analytics and Sentry.
        LATEST_VERSION_CHECK="false",
        COLLECT_ANALYTICS="false",
        LABEL_STUDIO_SENTRY_DSN="",
        LABEL_STUDIO_FRONTEND_SENTRY_DSN="",
        LOG_LEVEL=log_level,
        PYTHONUNBUFFERED="1",
    )
    env.update(extra_env or {})
    started = time.monotonic()
    if db_template is not None:
        template = Path(db_template).resolve()
        if not template.exists():
            _build_db_template(executable, template, env, log_path, start_timeout)
        shutil.copyfile(template, data_dir / "label_studio.sqlite3")
    cmd = [
        str(executable),
        "start",
        "--no-browser",
        "--internal-host",
        "127.0.0.1",
        "-p",
        str(port),
        "--enable-legacy-api-token",
    ]
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=work_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group, so stop() can kill all of it
        )
    server = LabelStudioServer(
        url=url,
        token=token,
        username=username,
        password=password,
        data_dir=data_dir,
        files_root=files_root,
        log_path=log_path,
        process=proc,
        env={**env, "_EXECUTABLE": str(executable)},
    )
    try:
        _wait_healthy(proc, url, log_path, start_timeout)
        server.startup_seconds = time.monotonic() - started
        _check_it_is_ours(server, port, log_path)
    except BaseException:
        server.stop()
        raise
    return server


def label_studio_version(venv: Path) -> str:
    """Installed Label Studio version in ``venv``, read from its dist-info (no slow import)."""
    found = sorted(Path(venv).glob("lib/python*/site-packages/label_studio-*.dist-info"))
    if not found:
        raise LabelStudioError(f"no label_studio dist-info in {venv}. Run `make install`.")
    return found[-1].name.removeprefix("label_studio-").removesuffix(".dist-info")


def _build_db_template(
    executable: Path, template: Path, env: dict[str, str], log_path: Path, timeout: float
) -> None:
    """Migrate an empty scratch data dir and keep its SQLite file as ``template``.

    ``label-studio version`` applies all migrations and exits without creating a user or a
    project. The file is written under a temporary name and renamed, so concurrent sessions
    never copy a half-written template.
    """
    template.parent.mkdir(parents=True, exist_ok=True)
    scratch = template.parent / f".build-{os.getpid()}-{secrets.token_hex(4)}"
    scratch.mkdir()
    try:
        build_env = {**env, "LABEL_STUDIO_BASE_DATA_DIR": str(scratch)}
        for key in ("LABEL_STUDIO_USERNAME", "LABEL_STUDIO_PASSWORD", "LABEL_STUDIO_USER_TOKEN"):
            build_env.pop(key, None)
        with log_path.open("ab") as log:
            log.write(b"=== building migrated database template ===\n")
            log.flush()
            try:
                subprocess.run(
                    [str(executable), "version"],
                    cwd=scratch,
                    env=build_env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    timeout=timeout,
                    check=True,
                    start_new_session=True,
                )
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
                raise LabelStudioError(
                    f"building the database template failed: {exc}\nLog {log_path} (tail):\n{_tail(log_path)}"
                ) from exc
        partial = template.with_name(f"{template.name}.{scratch.name}")
        shutil.copyfile(scratch / "label_studio.sqlite3", partial)
        os.replace(partial, template)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _check_it_is_ours(server: LabelStudioServer, port: int, log_path: Path) -> None:
    """Make sure the server on ``port`` is the one just started and the token works.

    Label Studio silently moves to the next port if its port is taken when it binds (after
    migrations, a minute after we picked the port), so a 200 on /health could come from
    another server. Its log then says "Trying to start at <port>".
    """
    moved = re.findall(r"Trying to start at (\d+)", _tail(log_path, max_lines=10_000))
    if moved:
        raise LabelStudioError(
            f"port {port} was taken while Label Studio started; it moved to {moved[-1]}. Retry."
        )
    response = server.api("GET", "/api/current-user/whoami", expected=(200, 401))
    if response.status_code != 200 or response.json().get("email") != server.username:
        raise LabelStudioError(
            f"{server.url} does not accept the generated token (HTTP {response.status_code}); "
            f"log {log_path} (tail):\n{_tail(log_path)}"
        )


@contextlib.contextmanager
def start_label_studio(
    venv: Path,
    work_dir: Path,
    port: int | None = None,
    **kwargs: Any,
) -> Iterator[LabelStudioServer]:
    """Context manager around :func:`launch_label_studio` that always stops the server."""
    server = launch_label_studio(venv, work_dir, port, **kwargs)
    try:
        yield server
    finally:
        server.stop()
