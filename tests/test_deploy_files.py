"""The deployment files (Dockerfile, docker-compose.yml, .env.example, .dockerignore, docker/) checked without Docker.

No Docker engine runs where these tests run, so nothing here builds the image or starts the stack. What is
checked is what can go wrong in the files themselves: the compose file parses, is valid under the Compose
Specification's schema and wires the services to each other; every ``${VAR}`` it uses is documented in
.env.example and nothing there is unused; every environment variable the annoloop code reads (found by
scanning the source, so this stays true as the code changes) is set for the annoloop services, and they set
nothing the code does not read; the image's entry point and the services' commands are real ``annoloop``
subcommands; the image runs as a non-root user and has a health check (and the health-check script works,
against real HTTP and Redis servers); the build copies every package the code imports; the worker reserves a
GPU; Label Studio runs with the settings a backend on a private network needs, under names Label Studio
1.23.2 reads.
"""

from __future__ import annotations

import ast
import base64
import http.server
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from annoloop import cli
from config import settings as settings_module
from config.settings import CONFIG_FILE_VAR, ENV_VARS, load_settings

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
COMPOSE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
DOCKERIGNORE = REPO / ".dockerignore"
HEALTHCHECK = REPO / "docker" / "healthcheck.py"
COMPOSE_SCHEMA = REPO / "docker" / "schema" / "compose-spec.json"

# The packages that run in the image, and what is scanned for environment variables (docker/: the health check).
PACKAGES = ("annoloop", "ml_backend", "training", "sync", "config")
SCANNED = (*PACKAGES, "docker")
ANNOLOOP_SERVICES = ("backend", "worker", "worker-cpu", "sync")
EXPECTED_SERVICES = {"postgres", "label-studio", "redis", *ANNOLOOP_SERVICES}
EXPECTED_VOLUMES = {"models", "ls-data", "pg-data", "redis-data"}

# Variables the code reads that the annoloop services leave unset on purpose, with the reason. (Every setting
# variable is set, ANNOLOOP_CONFIG included: it names the mounted overrides file, docker/annoloop.yaml.)
_DEMO_ONLY = (
    "read by `annoloop demo` (the local stack of `make demo`), which does not run in these containers"
)
_LS_PASSTHROUGH = (
    "passed, when set, to the Label Studio process that `annoloop demo` and the tests start "
    "(annoloop/labelstudio_server.py); here Label Studio runs in a container of its own"
)
OPTIONAL_UNSET: dict[str, str] = {
    "ANNOLOOP_CACHE": _DEMO_ONLY,
    "DEMO_DATA": _DEMO_ONLY,
    "DEMO_FORMAT": _DEMO_ONLY,
    "LANG": _LS_PASSTHROUGH,
    "LC_ALL": _LS_PASSTHROUGH,
    "TMPDIR": _LS_PASSTHROUGH,
    "TZ": _LS_PASSTHROUGH,
    "SYSTEMROOT": _LS_PASSTHROUGH,
}

# Variables the code reads that Docker itself sets in every container.
DOCKER_PROVIDED: dict[str, str] = {
    "HOME": "from the image user's passwd entry (/home/annoloop)",
    "HOSTNAME": "the container's host name",
}

# Variables the image or the services set for third-party code, not for annoloop's.
THIRD_PARTY: dict[str, str] = {
    "PATH": "the venv's bin first: `annoloop` and its python",
    "PYTHONUNBUFFERED": "python: log lines reach `docker logs` at once",
    "PYTHONDONTWRITEBYTECODE": "python: the venv is precompiled and not writable by the app user",
    "YOLO_OFFLINE": "ultralytics: never download at run time",
    "YOLO_CONFIG_DIR": "ultralytics: its settings file goes to a writable folder",
    "MPLCONFIGDIR": "matplotlib: its cache goes to a writable folder",
    "NVIDIA_DRIVER_CAPABILITIES": "NVIDIA Container Toolkit: mount the CUDA driver and nvidia-smi",
    "PYTORCH_NVML_BASED_CUDA_CHECK": "torch: training/queue.py defaults it (CUDA check without starting CUDA)",
}

# Read by docker compose itself from .env, never interpolated into the file.
COMPOSE_CLI_VARS = {"COMPOSE_PROFILES"}

# .env.example leaves these empty so that `docker compose up` stops with a message until they are filled in.
REQUIRED_SECRETS = {
    "POSTGRES_PASSWORD",
    "LABEL_STUDIO_USERNAME",
    "LABEL_STUDIO_PASSWORD",
    "LABEL_STUDIO_USER_TOKEN",
}
DUMMY_SECRETS = {
    "POSTGRES_PASSWORD": "pg-secret",
    "LABEL_STUDIO_USERNAME": "admin@example.com",
    "LABEL_STUDIO_PASSWORD": "ls-secret",
    "LABEL_STUDIO_USER_TOKEN": "0123456789abcdef0123",
}


# --- compose interpolation -------------------------------------------------------------------------------


class MissingVariable(ValueError):
    """A ``${VAR:?message}`` whose variable is unset or empty: docker compose stops with the message."""


@dataclass(frozen=True)
class Ref:
    """One ``${name<op>arg}``; ``arg`` is itself parsed (compose allows nesting: ``${A:-${B}}``)."""

    name: str
    op: str
    arg: tuple[str | Ref, ...]


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OPS = (":-", ":?", ":+", "-", "?", "+")


def parse_interpolation(text: str) -> tuple[str | Ref, ...]:
    """Compose's variable syntax: ``$$`` a literal dollar, ``$VAR``, ``${VAR}`` and ``${VAR<op>arg}``."""
    nodes: list[str | Ref] = []
    i = 0
    while i < len(text):
        if text[i] != "$":
            j = text.find("$", i)
            j = len(text) if j < 0 else j
            nodes.append(text[i:j])
            i = j
        elif text.startswith("$$", i):
            nodes.append("$")
            i += 2
        elif text.startswith("${", i):
            depth, j = 1, i + 2
            while depth:
                if j >= len(text):
                    raise ValueError(f"unclosed ${{ in {text!r}")
                if text.startswith("$$", j):
                    j += 2
                    continue
                if text.startswith("${", j):
                    depth, j = depth + 1, j + 2
                    continue
                depth -= text[j] == "}"
                j += 1
            body = text[i + 2 : j - 1]
            m = _NAME.match(body)
            rest = body[m.end() :] if m else body
            op = "" if not rest else next((o for o in _OPS if rest.startswith(o)), None)
            if m is None or op is None:
                raise ValueError(f"not a compose variable: ${{{body}}} in {text!r}")
            nodes.append(Ref(m.group(), op, parse_interpolation(rest[len(op) :])))
            i = j
        elif m := _NAME.match(text, i + 1):
            nodes.append(Ref(m.group(), "", ()))
            i = m.end()
        else:
            nodes.append("$")
            i += 1
    return tuple(nodes)


def evaluate(nodes: tuple[str | Ref, ...], env: dict[str, str]) -> str:
    out = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
            continue
        value = env.get(node.name)
        present = bool(value) if node.op.startswith(":") else value is not None
        if node.op in (":-", "-"):
            out.append(value if present else evaluate(node.arg, env))
        elif node.op in (":?", "?"):
            if not present:
                raise MissingVariable(f"{node.name}: {evaluate(node.arg, env)}")
            out.append(value)
        elif node.op in (":+", "+"):
            out.append(evaluate(node.arg, env) if present else "")
        else:
            out.append(value or "")
    return "".join(out)


def ref_names(nodes: tuple[str | Ref, ...]) -> set[str]:
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, Ref):
            names |= {node.name} | ref_names(node.arg)
    return names


def strings(obj: Any) -> Iterator[str]:
    """Every string value of a parsed YAML document (compose interpolates values, not keys)."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from strings(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from strings(value)


def resolve(obj: Any, env: dict[str, str]) -> Any:
    if isinstance(obj, str):
        return evaluate(parse_interpolation(obj), env)
    if isinstance(obj, dict):
        return {k: resolve(v, env) for k, v in obj.items()}
    if isinstance(obj, list):
        return [resolve(v, env) for v in obj]
    return obj


# --- the files -----------------------------------------------------------------------------------------


@dataclass
class EnvLine:
    name: str
    value: str
    documented: bool


def read_env_example(path: Path = ENV_EXAMPLE) -> dict[str, EnvLine]:
    """``NAME=value`` lines; a variable is documented when its block (lines without a blank between them)
    starts with a comment."""
    out: dict[str, EnvLine] = {}
    block_commented = False
    previous_blank = True
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped:
            previous_blank = True
            continue
        if previous_blank:
            block_commented = stripped.startswith("#")
        previous_blank = False
        if stripped.startswith("#"):
            continue
        name, sep, value = stripped.partition("=")
        assert sep and _NAME.fullmatch(name), f".env.example: not a NAME=value line: {line!r}"
        assert name not in out, f".env.example sets {name} twice"
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out[name] = EnvLine(name, value, block_commented)
    return out


def example_env(**overrides: str) -> dict[str, str]:
    """The environment compose would interpolate with: .env.example, its required secrets filled in."""
    env = {name: line.value for name, line in read_env_example().items()}
    env.update({k: v for k, v in DUMMY_SECRETS.items() if not env.get(k)})
    env.update(overrides)
    return env


def load_compose(path: Path = COMPOSE) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path.name} is not a YAML mapping"
    return data


def resolved_compose(**overrides: str) -> dict[str, Any]:
    return resolve(load_compose(), example_env(**overrides))


def service_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # the "- NAME=value" form
        env = dict(item.partition("=")[::2] for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


@dataclass
class Instruction:
    stage: int
    keyword: str
    args: str


def read_dockerfile(path: Path = DOCKERFILE) -> list[Instruction]:
    """Instructions with their stage (counted by FROM), continuation lines joined, comments dropped."""
    instructions: list[Instruction] = []
    stage = -1
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        stage += keyword == "FROM"
        instructions.append(Instruction(stage, keyword, args.strip()))
    return instructions


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    last = max(i.stage for i in instructions)
    return [i for i in instructions if i.stage == last]


def dockerfile_env(instructions: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in final_stage(instructions):
        if ins.keyword == "ENV":
            for pair in shlex.split(ins.args):
                name, _, value = pair.partition("=")
                env[name] = value
    return env


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), f"not exec form: {args}"
    return value


def copy_sources(instructions: list[Instruction]) -> list[str]:
    """Sources of COPY/ADD from the build context (not --from another stage), without a trailing slash."""
    sources = []
    for ins in instructions:
        if ins.keyword not in ("COPY", "ADD"):
            continue
        words = shlex.split(ins.args)
        if any(w.startswith("--from=") for w in words):
            continue
        words = [w for w in words if not w.startswith("--")]
        sources += [w.rstrip("/") for w in words[:-1]]
    return sources


def single_instruction(instructions: list[Instruction], keyword: str) -> Instruction:
    found = [i for i in final_stage(instructions) if i.keyword == keyword]
    assert len(found) == 1, f"the final stage should have one {keyword}, has {len(found)}"
    return found[0]


def healthcheck_command(instructions: list[Instruction]) -> list[str]:
    args = single_instruction(instructions, "HEALTHCHECK").args
    options, cmd, command = args.partition("CMD ")
    assert cmd, f"HEALTHCHECK without CMD: {args}"
    assert all(o.startswith("--") for o in options.split()), f"HEALTHCHECK options: {options}"
    return exec_form(command)


# --- what the code reads --------------------------------------------------------------------------------


@dataclass
class EnvUse:
    reads: set[str]
    defaults: set[str]  # os.environ.setdefault(NAME, ...): a value for a third-party library
    passed_on: list[str]  # the whole environment copied, updated or handed to a child process
    opaque: list[str]  # uses of os.environ this scan cannot follow


@dataclass(frozen=True)
class _OsNames:
    """How a module spells os, os.environ and os.getenv (``import os as _os``, ``from os import environ``)."""

    os: frozenset[str]
    environ: frozenset[str]
    getenv: frozenset[str]

    @classmethod
    def of(cls, tree: ast.Module) -> _OsNames:
        names: dict[str, set[str]] = {"os": set(), "environ": set(), "getenv": set()}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names["os"] |= {a.asname or a.name for a in node.names if a.name == "os"}
            elif isinstance(node, ast.ImportFrom) and node.module == "os" and node.level == 0:
                for a in node.names:
                    if a.name in ("environ", "getenv"):
                        names[a.name].add(a.asname or a.name)
        return cls(*(frozenset(names[k]) for k in ("os", "environ", "getenv")))

    def is_os(self, node: ast.AST) -> bool:
        return isinstance(node, ast.Name) and node.id in self.os

    def is_environ(self, node: ast.AST) -> bool:
        if isinstance(node, ast.Attribute):
            return node.attr == "environ" and self.is_os(node.value)
        return isinstance(node, ast.Name) and node.id in self.environ and isinstance(node.ctx, ast.Load)

    def is_getenv(self, node: ast.AST) -> bool:
        if isinstance(node, ast.Attribute):
            return node.attr == "getenv" and self.is_os(node.value)
        return isinstance(node, ast.Name) and node.id in self.getenv


def _strings(node: ast.AST | None) -> list[str] | None:
    """A string constant, or a tuple/list/set of them, as a list; None for anything else."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        items = [_strings(e) for e in node.elts]
        if all(i is not None and len(i) == 1 for i in items):
            return [i[0] for i in items]  # type: ignore[index]
    return None


def _names(tree: ast.Module) -> dict[str, list[str]]:
    """What a name can hold: module-level string constants and collections of them, and the variables of
    loops and comprehensions over those (``for key in PASSTHROUGH``)."""
    names: dict[str, list[str]] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign | ast.AnnAssign) and (value := _strings(node.value)) is not None:
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(target, ast.Name):
                    names[target.id] = value
    for node in ast.walk(tree):
        if isinstance(node, ast.For | ast.comprehension) and isinstance(node.target, ast.Name):
            over = _strings(node.iter)
            if over is None and isinstance(node.iter, ast.Name) and node.iter.id in names:
                over = names[node.iter.id]
            if over is not None:
                names[node.target.id] = over
    return names


def scan_environment_use(roots: tuple[str, ...] = SCANNED, base: Path = REPO) -> EnvUse:
    """Names read through os.environ[...], os.environ.get/pop, ``in os.environ`` and os.getenv, and names
    given a default with os.environ.setdefault, in every module under ``roots``. A name may be a literal, a
    module constant, or a loop variable over a constant collection. Copying the whole environment
    (``{**os.environ}``, ``dict(os.environ)``, ``.copy()``) or updating it reads no variable and is listed as
    passed on; any other use (a name computed at run time, iterating it) is reported as opaque."""
    use = EnvUse(set(), set(), [], [])
    for root in roots:
        for path in sorted((base / root).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            names = _names(tree)
            osn = _OsNames.of(tree)
            where = path.relative_to(base)

            def resolve_names(
                node: ast.AST, where: Path = where, names: dict[str, list[str]] = names
            ) -> list[str]:
                if (value := _strings(node)) is not None:
                    return value
                if isinstance(node, ast.Name) and node.id in names:
                    return names[node.id]
                use.opaque.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
                return []

            handled: set[int] = set()
            for node in ast.walk(tree):
                if isinstance(node, ast.Subscript) and osn.is_environ(node.value):
                    handled.add(id(node.value))
                    use.reads.update(resolve_names(node.slice))
                elif isinstance(node, ast.Compare) and any(osn.is_environ(c) for c in node.comparators):
                    handled.update(id(c) for c in node.comparators)
                    use.reads.update(resolve_names(node.left))
                elif isinstance(node, ast.Dict) and any(
                    k is None and osn.is_environ(v) for k, v in zip(node.keys, node.values, strict=True)
                ):
                    handled.update(id(v) for v in node.values if osn.is_environ(v))
                    use.passed_on.append(f"{where}:{node.lineno}")
                elif isinstance(node, ast.Call):
                    func = node.func
                    if isinstance(func, ast.Attribute) and osn.is_environ(func.value):
                        handled.add(id(func.value))
                        if func.attr in ("get", "pop", "setdefault") and node.args:
                            target = use.defaults if func.attr == "setdefault" else use.reads
                            target.update(resolve_names(node.args[0]))
                        elif func.attr in ("copy", "update"):
                            use.passed_on.append(f"{where}:{node.lineno}")
                        else:
                            use.opaque.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
                    elif osn.is_getenv(func) and node.args:
                        use.reads.update(resolve_names(node.args[0]))
                    elif (
                        isinstance(func, ast.Name)
                        and func.id == "dict"
                        and len(node.args) == 1
                        and osn.is_environ(node.args[0])
                    ):
                        handled.add(id(node.args[0]))
                        use.passed_on.append(f"{where}:{node.lineno}")
            for node in ast.walk(tree):
                if osn.is_environ(node) and id(node) not in handled:
                    use.opaque.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
    return use


# The one opaque use that is accounted for: load_settings() reads the variables of its own table.
SETTINGS_FILE = Path(settings_module.__file__).resolve().relative_to(REPO)
SETTINGS_READS = {*ENV_VARS, CONFIG_FILE_VAR}


def code_environment() -> tuple[set[str], set[str]]:
    """(variables the annoloop code reads, variables it only gives defaults for third-party code)."""
    use = scan_environment_use()
    unexplained = [o for o in use.opaque if not o.startswith(f"{SETTINGS_FILE}:")]
    assert not unexplained, (
        "os.environ is used in a way this scan cannot follow; read variables by constant name, or teach "
        f"tests/test_deploy_files.py about it: {unexplained}"
    )
    return use.reads | SETTINGS_READS, use.defaults - use.reads - SETTINGS_READS


def first_party_imports(roots: tuple[str, ...] = PACKAGES) -> set[str]:
    """Top-level packages of this repository imported anywhere in the code that runs in the image."""
    found: set[str] = set(roots)
    for root in roots:
        for path in (REPO / root).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                for name in names:
                    top = name.split(".")[0]
                    if (REPO / top / "__init__.py").is_file():
                        found.add(top)
    return found


def dockerignore_patterns(path: Path = DOCKERIGNORE) -> list[tuple[bool, re.Pattern[str]]]:
    """(exclude?, regex) per line, in order; Docker's syntax: ``*`` within one path part, ``**`` any depth,
    ``!`` re-includes, and a pattern matching a folder covers everything under it."""
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip().strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        out.append((not negate, re.compile(regex)))
    return out


def in_build_context(relpath: str, patterns: list[tuple[bool, re.Pattern[str]]]) -> bool:
    parts = relpath.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for exclude, regex in patterns:
        if any(regex.fullmatch(p) for p in prefixes):
            excluded = exclude
    return not excluded


# --- compose: services, network, volumes ------------------------------------------------------------------


def test_compose_parses_with_the_services_on_one_network_and_the_volumes():
    compose = load_compose()
    services = compose["services"]
    assert set(services) == EXPECTED_SERVICES
    assert set(compose.get("volumes") or {}) == EXPECTED_VOLUMES
    (network,) = compose["networks"]
    for name, service in services.items():
        assert service.get("networks") == [network], f"service {name} is not (only) on network {network}"
    mounts = {name: service.get("volumes") or [] for name, service in services.items()}
    assert "ls-data:/label-studio/data" in mounts["label-studio"]
    assert "pg-data:/var/lib/postgresql/data" in mounts["postgres"]
    assert "redis-data:/data" in mounts["redis"]
    for name in ANNOLOOP_SERVICES:
        model_dir = service_env(services[name])["MODEL_DIR"]
        assert f"models:{model_dir}" in mounts[name], f"{name} does not mount the models volume at MODEL_DIR"
    for name in ("backend", "worker", "worker-cpu", "sync"):
        assert services[name]["build"]["context"] == "."
    assert len({services[name]["image"] for name in ANNOLOOP_SERVICES}) == 1, "one image for all of annoloop"


def test_compose_file_is_valid_under_the_compose_specification_schema():
    """The schema docker compose validates against (after interpolation), vendored in docker/schema/ from the
    Compose Specification (Apache-2.0; the copy check-jsonschema 0.39.0 ships): misspelt keys, wrong
    depends_on conditions or healthcheck fields fail here instead of at `docker compose up`."""
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    # With .env.example, and with only the secrets set (every other value from the compose file's defaults).
    for env in (example_env(), dict(DUMMY_SECRETS)):
        document = resolve(load_compose(), env)
        errors = [
            f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)
        ]
        assert errors == []


def test_annoloop_services_share_one_environment_and_reach_the_other_services():
    compose = resolved_compose()
    services = compose["services"]
    envs = {name: service_env(services[name]) for name in ANNOLOOP_SERVICES}
    assert all(env == envs["backend"] for env in envs.values()), "backend, worker and sync disagree"
    env = envs["backend"]
    ls = urlparse(env["LABEL_STUDIO_URL"])
    assert ls.hostname == "label-studio"
    assert any(str(p).endswith(f":{ls.port}") for p in services["label-studio"]["ports"])
    redis_url = urlparse(env["REDIS_URL"])
    assert redis_url.hostname in services and "redis" in services[redis_url.hostname]["image"]
    # The backend URL people give Label Studio (.env.example) is the service name and the port it serves on.
    command = services["backend"]["command"]
    assert command[command.index("--port") + 1] == "9090"
    assert "http://backend:9090" in ENV_EXAMPLE.read_text()
    assert "9090" in single_instruction(read_dockerfile(), "EXPOSE").args.split()


def test_compose_environment_gives_valid_annoloop_settings():
    """What the services would start with (.env.example plus secrets) passes annoloop's own validation,
    with the overrides file that compose mounts."""
    compose = resolved_compose()
    service = compose["services"]["backend"]
    env = service_env(service)
    mount = next(v for v in service["volumes"] if v.split(":")[1] == env[CONFIG_FILE_VAR])
    env[CONFIG_FILE_VAR] = str(REPO / mount.split(":")[0])
    settings = load_settings(env=env)
    assert str(settings.model_dir) == "/data/models"
    assert settings.label_studio.api_key.get_secret_value() == DUMMY_SECRETS["LABEL_STUDIO_USER_TOKEN"]
    assert not settings.basic_auth.enabled
    # A key of its own replaces the admin's token.
    own = resolved_compose(LABEL_STUDIO_API_KEY="pat-xyz")["services"]["backend"]
    assert service_env(own)["LABEL_STUDIO_API_KEY"] == "pat-xyz"


# --- .env.example ---------------------------------------------------------------------------------------


def test_every_compose_variable_is_in_env_example_documented_and_none_is_unused():
    compose = load_compose()
    used: set[str] = set()
    for text in strings(compose):
        used |= ref_names(parse_interpolation(text))
    example = read_env_example()
    assert used - set(example) == set(), "used in docker-compose.yml, missing from .env.example"
    assert set(example) - used - COMPOSE_CLI_VARS == set(), "in .env.example, used nowhere"
    undocumented = [name for name, line in example.items() if not line.documented]
    assert undocumented == [], "variables without a comment in .env.example"


def test_compose_variables_have_a_default_or_are_required_and_defaults_match_env_example():
    example = read_env_example()
    for text in strings(load_compose()):
        for node in parse_interpolation(text):
            if not isinstance(node, Ref):
                continue
            assert node.op in (":-", ":?"), f"${{{node.name}}} needs :-default or :?message ({text!r})"
            literal = all(isinstance(a, str) for a in node.arg)
            if node.op == ":-" and literal:
                assert example[node.name].value == "".join(node.arg), (
                    f"{node.name}: compose default {''.join(node.arg)!r} != .env.example {example[node.name].value!r}"
                )
            if node.name in REQUIRED_SECRETS:
                assert node.op == ":?", f"secret {node.name} must be required (${{{node.name}:?...}})"
    for name in REQUIRED_SECRETS:
        assert example[name].value == "", f"{name} must be empty in .env.example (no shipped secrets)"
    with pytest.raises(MissingVariable, match="POSTGRES_PASSWORD"):
        resolve(load_compose(), {k: v.value for k, v in example.items()})


def test_compose_profiles_pick_the_worker():
    example = read_env_example()
    services = load_compose()["services"]
    profiles = {p for s in services.values() for p in s.get("profiles", [])}
    assert set(example["COMPOSE_PROFILES"].value.split(",")) <= profiles
    assert services["worker"]["profiles"] == ["gpu"] and services["worker-cpu"]["profiles"] == ["cpu"]
    unprofiled = {name for name, s in services.items() if not s.get("profiles")}
    assert unprofiled == EXPECTED_SERVICES - {"worker", "worker-cpu"}

    def without_gpu(service: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in service.items() if k not in ("profiles", "deploy")}

    assert without_gpu(services["worker"]) == without_gpu(services["worker-cpu"]), "worker-cpu = worker - GPU"


# --- environment variables: code vs. compose and image ----------------------------------------------------


def test_every_variable_the_code_reads_is_set_for_the_annoloop_services():
    reads, _ = code_environment()
    assert set(ENV_VARS) <= reads and CONFIG_FILE_VAR in reads  # the scan sees the settings table
    assert set(OPTIONAL_UNSET) <= reads, "OPTIONAL_UNSET names a variable the code no longer reads"
    image_env = dockerfile_env(read_dockerfile())
    services = load_compose()["services"]
    for name in ANNOLOOP_SERVICES:
        missing = (
            reads
            - set(service_env(services[name]))
            - set(image_env)
            - set(OPTIONAL_UNSET)
            - set(DOCKER_PROVIDED)
        )
        assert missing == set(), f"{name}: the code reads these, nothing sets them"


def test_annoloop_services_and_image_set_nothing_the_code_does_not_read():
    reads, defaults = code_environment()
    known = reads | defaults | set(THIRD_PARTY)
    image_env = dockerfile_env(read_dockerfile())
    assert set(image_env) - known == set(), "the Dockerfile sets variables nothing reads"
    services = load_compose()["services"]
    for name in ANNOLOOP_SERVICES:
        assert set(service_env(services[name])) - known == set(), f"{name} sets variables nothing reads"
    assert defaults <= set(THIRD_PARTY), (
        "the code gives a new variable a default: say in THIRD_PARTY what reads it"
    )


def test_environment_scan_finds_reads_and_flags_what_it_cannot_follow(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "m.py").write_text(
        "import os\nfrom os import environ\nNAME = 'C_VAR'\nKEEP = ('F_VAR', 'G_VAR')\n"
        "a = os.environ['A_VAR']\nb = os.environ.get('B_VAR', '')\nc = os.getenv(NAME)\n"
        "d = 'D_VAR' in environ\nos.environ.setdefault('E_VAR', '1')\n"
        "kept = {k: os.environ[k] for k in KEEP if k in os.environ}\n"
        "child = {**os.environ, 'X': '1'}\nos.environ.update(child)\n"
        "def f(x):\n    return os.environ.get(x)\n"
        "g = list(os.environ)\n"
        "import os as _os\nfrom os import getenv as ge\nh = _os.environ.get('H_VAR')\ni = ge('I_VAR')\n"
    )
    use = scan_environment_use(("pkg",), base=tmp_path)
    assert use.reads == {"A_VAR", "B_VAR", "C_VAR", "D_VAR", "F_VAR", "G_VAR", "H_VAR", "I_VAR"}
    assert use.defaults == {"E_VAR"}
    assert use.passed_on == ["pkg/m.py:11", "pkg/m.py:12"]
    assert sorted(use.opaque) == ["pkg/m.py:14: x", "pkg/m.py:15: os.environ"]


# --- the image --------------------------------------------------------------------------------------------


def test_entry_point_and_service_commands_are_annoloop_subcommands():
    instructions = read_dockerfile()
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    entrypoint = exec_form(single_instruction(instructions, "ENTRYPOINT").args)
    assert entrypoint == ["annoloop"] and scripts["annoloop"] == "annoloop.cli:main"
    parser = cli.build_parser()
    default = parser.parse_args(exec_form(single_instruction(instructions, "CMD").args))
    assert default.func is cli.cmd_serve and default.host == "0.0.0.0" and default.port == 9090
    services = resolved_compose()["services"]
    expected = {"backend": cli.cmd_serve, "worker": cli.cmd_worker, "worker-cpu": cli.cmd_worker}
    expected["sync"] = cli.cmd_sync
    for name, func in expected.items():
        args = parser.parse_args(services[name]["command"])
        assert args.func is func, f"{name} runs {args.func.__name__}"
    sync = parser.parse_args(services["sync"]["command"])
    assert sync.all and sync.every == 600.0 and not sync.project and not sync.dry_run
    hourly = resolved_compose(SYNC_EVERY="1h")["services"]["sync"]["command"]
    assert parser.parse_args(hourly).every == 3600.0


def test_image_runs_as_non_root_after_the_last_root_step():
    final = final_stage(read_dockerfile())
    users = [n for n, i in enumerate(final) if i.keyword == "USER"]
    runs = [n for n, i in enumerate(final) if i.keyword == "RUN"]
    assert users, "the final stage has no USER: it would run as root"
    assert users[-1] > max(runs, default=-1), "a RUN comes after the last USER (or USER is never set)"
    user, _, group = final[users[-1]].args.partition(":")
    assert user not in ("root", "0") and group not in ("root", "0"), f"USER {final[users[-1]].args}"
    uid = int(user) if user.isdigit() else None
    useradd = " ".join(i.args for i in final if i.keyword == "RUN")
    assert uid is not None and f"--uid {uid}" in useradd, "USER should be the numeric uid the image creates"


def test_image_has_a_health_check_that_runs_a_copied_script():
    instructions = read_dockerfile()
    command = healthcheck_command(instructions)
    assert command[0] == "python" and command[2] == "serve"
    in_image = command[1]
    copies = [shlex.split(i.args) for i in final_stage(instructions) if i.keyword == "COPY"]
    assert any(words[-1] == in_image and (REPO / words[-2]).is_file() for words in copies), (
        f"{in_image} is not copied into the image"
    )
    for name, service in load_compose()["services"].items():
        check = service.get("healthcheck", {})
        if name in ANNOLOOP_SERVICES and "test" in check:
            assert check["test"] == ["CMD", "python", in_image, "worker"] and name.startswith("worker")
    assert load_compose()["services"]["sync"]["healthcheck"] == {"disable": True}


def test_image_copies_every_package_the_code_imports_and_the_context_has_them():
    instructions = read_dockerfile()
    copied = set(copy_sources(instructions))
    packages = first_party_imports()
    hatch = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"]["wheel"]
    assert packages <= set(hatch["packages"]), "imported but not in the wheel (tool.hatch...packages)"
    assert packages <= copied, "imported but not copied into the image"
    assert {"pyproject.toml", "uv.lock"} <= copied
    patterns = dockerignore_patterns()
    for source in sorted(copied):
        files = (
            [source]
            if (REPO / source).is_file()
            else [str(p.relative_to(REPO)) for p in (REPO / source).rglob("*.py")]
        )
        assert files, f"COPY {source}: nothing there"
        for f in files:
            if "__pycache__" not in f:
                assert in_build_context(f, patterns), f"{f} is copied but .dockerignore leaves it out"
    assert not in_build_context(".venv/bin/python", patterns) and not in_build_context(".env", patterns)
    assert not in_build_context("annoloop/__pycache__/cli.cpython-311.pyc", patterns)


def test_image_installs_from_the_lock_with_the_makefiles_uv():
    instructions = read_dockerfile()
    makefile = re.search(r"^UV_VERSION\s*:=\s*(\S+)", (REPO / "Makefile").read_text(), re.M)
    args = [i.args for i in instructions if i.keyword == "ARG" and i.args.startswith("UV_VERSION=")]
    assert makefile and args == [f"UV_VERSION={makefile.group(1)}"]
    syncs = [i.args for i in instructions if i.keyword == "RUN" and "uv sync" in i.args]
    assert syncs and all("--frozen" in s and "--no-dev" in s for s in syncs)
    assert dockerfile_env(instructions)["MODEL_DIR"] == "/data/models"


# --- GPU and Label Studio ---------------------------------------------------------------------------------


def test_worker_reserves_an_nvidia_gpu():
    devices = load_compose()["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        d.get("driver") == "nvidia"
        and "gpu" in d.get("capabilities", [])
        and (d.get("count") == "all" or d.get("count", 0) >= 1)
        for d in devices
    )
    assert "deploy" not in load_compose()["services"]["worker-cpu"]


def test_label_studio_is_set_up_for_a_backend_on_the_private_network():
    compose = resolved_compose()
    services = compose["services"]
    ls = services["label-studio"]
    env = service_env(ls)
    assert env["ML_BLOCK_LOCAL_IP"].lower() == "false"
    assert env["SSRF_PROTECTION_ENABLED"].lower() == "false"
    assert env["LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN"].lower() == "true"
    pinned = re.search(
        r"^label-studio==(\S+)", (REPO / "requirements" / "label-studio.txt").read_text(), re.M
    )
    assert pinned and ls["image"] == f"heartexlabs/label-studio:{pinned.group(1)}"
    # PostgreSQL: the database, user and password Label Studio uses are the ones postgres was created with.
    pg = service_env(services["postgres"])
    assert env["DJANGO_DB"] == "default" and env["POSTGRE_HOST"] == "postgres"
    assert (env["POSTGRE_NAME"], env["POSTGRE_USER"], env["POSTGRE_PASSWORD"]) == (
        pg["POSTGRES_DB"],
        pg["POSTGRES_USER"],
        pg["POSTGRES_PASSWORD"],
    )
    # The admin's token is the annoloop services' key when they are given none of their own.
    assert service_env(services["backend"])["LABEL_STUDIO_API_KEY"] == env["LABEL_STUDIO_USER_TOKEN"]
    assert 6 <= len(env["LABEL_STUDIO_USER_TOKEN"]) <= 40
    root = env["LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"]
    assert any(v.split(":")[1] == root for v in ls["volumes"]), "the local-files root is not mounted"


def _label_studio_env_names(package: Path) -> set[str]:
    """Names Label Studio reads: get_env('X') looks at LABEL_STUDIO_X, HEARTEX_X and X."""
    get_env = re.compile(r"get_(?:bool_)?env(?:_list(?:_int)?)?\(\s*['\"]([A-Za-z0-9_]+)['\"]")
    direct = re.compile(r"(?:environ\.get\(|environ\[|getenv\()\s*['\"]([A-Za-z0-9_]+)['\"]")
    names: set[str] = set()
    for path in package.rglob("*.py"):
        if "tests" in path.parts:
            continue
        text = path.read_text(errors="replace")
        for name in get_env.findall(text):
            names |= {name, f"LABEL_STUDIO_{name}", f"HEARTEX_{name}"}
        names |= set(direct.findall(text))
    return names


def test_label_studio_variables_are_ones_label_studio_reads():
    packages = sorted((REPO / ".ls-venv" / "lib").glob("python3*/site-packages/label_studio"))
    if not packages:
        pytest.skip("Label Studio is not installed in .ls-venv (make install)")
    known = _label_studio_env_names(packages[0])
    assert {
        "ML_BLOCK_LOCAL_IP",
        "SSRF_PROTECTION_ENABLED",
        "LABEL_STUDIO_USERNAME",
    } <= known  # the scan works
    env = service_env(load_compose()["services"]["label-studio"])
    assert set(env) - known == set(), "set on label-studio, read nowhere in Label Studio 1.23.2"


# --- the health-check script ------------------------------------------------------------------------------


def _run_healthcheck(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ENV_VARS and k != CONFIG_FILE_VAR}
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK), *args],
        env={**clean, **env},
        cwd=HEALTHCHECK.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )


class _Health(http.server.BaseHTTPRequestHandler):
    answer: tuple[int, dict[str, Any]] = (200, {"status": "UP"})
    auth: str | None = None

    def do_GET(self):
        code, body = self.answer
        if self.auth and self.headers.get("Authorization") != self.auth:
            code, body = 401, {"error": "auth"}
        if self.path != "/health":
            code, body = 404, {}
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def health_server() -> Iterator[tuple[int, type[_Health]]]:
    handler = type("Health", (_Health,), {})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], handler
    server.shutdown()
    server.server_close()


def test_healthcheck_serve_mode(health_server):
    port, handler = health_server
    ok = _run_healthcheck("serve", str(port), env={})
    assert ok.returncode == 0, ok.stdout + ok.stderr
    handler.answer = (200, {"status": "DOWN"})
    assert _run_healthcheck("serve", str(port), env={}).returncode == 1
    handler.answer = (500, {"status": "UP"})
    assert _run_healthcheck("serve", str(port), env={}).returncode == 1
    # Basic auth on: the check sends the service's own user and password.
    handler.answer = (200, {"status": "UP"})
    handler.auth = "Basic " + base64.b64encode(b"ann:s3cret").decode()
    assert _run_healthcheck("serve", str(port), env={}).returncode == 1
    creds = {"BASIC_AUTH_USER": "ann", "BASIC_AUTH_PASS": "s3cret"}
    authed = _run_healthcheck("serve", str(port), env=creds)
    assert authed.returncode == 0, authed.stdout + authed.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    refused = _run_healthcheck("serve", str(closed), env={})
    assert refused.returncode == 1 and refused.stdout.startswith("unhealthy")


def test_healthcheck_worker_mode(redis_url):
    import redis
    from rq import Queue, Worker

    url = redis_url.rsplit("/", 1)[0] + "/7"  # a database of its own on the session's Redis
    conn = redis.Redis.from_url(url)
    assert _run_healthcheck("worker", env={"REDIS_URL": url}).returncode == 1
    queue = Queue("deploy-test", connection=conn)
    # A worker of another container (another host name) on the same Redis does not make this one healthy.
    other = Worker([queue], connection=conn, name=f"deploy-other-{uuid.uuid4().hex}")
    other.hostname = "another-container"
    other.register_birth()
    worker = Worker([queue], connection=conn, name=f"deploy-{uuid.uuid4().hex}")
    try:
        assert _run_healthcheck("worker", env={"REDIS_URL": url}).returncode == 1
        worker.register_birth()
        ok = _run_healthcheck("worker", env={"REDIS_URL": url})
        assert ok.returncode == 0, ok.stdout + ok.stderr
    finally:
        worker.register_death()
        other.register_death()
    assert _run_healthcheck("worker", env={"REDIS_URL": url}).returncode == 1
    gone = _run_healthcheck("worker", env={"REDIS_URL": "redis://127.0.0.1:1/0"})
    assert gone.returncode == 1 and gone.stdout.startswith("unhealthy")
