"""Settings: config/default.yaml, overridden by an ANNOLOOP_CONFIG file, overridden by environment variables.

Validation happens once, at start, so a typo fails loudly with the setting's dotted name instead of
surfacing later as a confusing runtime error. Secrets are ``SecretStr`` so they never reach a log or a repr.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

DEFAULT_CONFIG = Path(__file__).with_name("default.yaml")

# Environment variable -> dotted setting. Names follow label-studio-ml 2.x so existing deployments carry over.
ENV_VARS: dict[str, str] = {
    "LABEL_STUDIO_URL": "label_studio.url",
    "LABEL_STUDIO_API_KEY": "label_studio.api_key",
    "REDIS_URL": "redis_url",
    "MODEL_DIR": "model_dir",
    "BASIC_AUTH_USER": "basic_auth.user",
    "BASIC_AUTH_PASS": "basic_auth.password",
    "LOG_LEVEL": "log_level",
}
CONFIG_FILE_VAR = "ANNOLOOP_CONFIG"


class ConfigError(ValueError):
    """A setting is invalid; the message names it."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LabelStudioSettings(_Section):
    url: str = ""
    api_key: SecretStr = SecretStr("")

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        v = v.strip().rstrip("/")
        if v and (urlparse(v).scheme not in ("http", "https") or not urlparse(v).netloc):
            raise ValueError("must be an http(s) URL like http://localhost:8080")
        return v


class BasicAuthSettings(_Section):
    user: str = ""
    password: SecretStr = SecretStr("")

    @property
    def enabled(self) -> bool:
        return bool(self.user)


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(9090, ge=1, le=65535)
    threads: int = Field(8, ge=1, le=256)


class InferenceSettings(_Section):
    device: str = "auto"
    imgsz: int | None = Field(None, ge=32, le=8192)
    prelabel_conf: float = Field(0.25, ge=0.0, le=1.0)
    uncertainty_conf: float = Field(0.05, ge=0.0, le=1.0)
    iou: float = Field(0.7, gt=0.0, le=1.0)
    max_det: int = Field(300, ge=1)
    batch_size: int = Field(16, ge=1, le=1024)


class ImageSettings(_Section):
    fetch_workers: int = Field(8, ge=1, le=128)
    timeout_s: float = Field(10.0, gt=0)
    max_bytes: int = Field(50 * 1024 * 1024, ge=1024)
    max_pixels: int = Field(60_000_000, ge=1024)


class UncertaintyWeights(_Section):
    least_confidence: float = Field(1.0, ge=0.0)
    entropy: float = Field(1.0, ge=0.0)
    margin: float = Field(1.0, ge=0.0)
    confidence_variance: float = Field(0.0, ge=0.0)
    detection_count: float = Field(0.25, ge=0.0)


class UncertaintySettings(_Section):
    aggregation: Literal["mean", "max", "topk_sum"] = "topk_sum"
    top_k: int = Field(10, ge=1)
    empty_floor: float = Field(0.5, ge=0.0, le=1.0)
    count_half_saturation: float = Field(5.0, gt=0.0)
    weights: UncertaintyWeights = UncertaintyWeights()


class ConvergenceSettings(_Section):
    target_map50: float | None = Field(0.95, ge=0.0, le=1.0)
    plateau_window: int = Field(3, ge=1)
    plateau_min_gain: float = Field(0.005, ge=0.0)
    max_overfit_gap: float | None = Field(0.25, ge=0.0)
    max_versions: int | None = Field(50, ge=1)
    min_holdout_tasks: int = Field(20, ge=0)


class TrainingSettings(_Section):
    min_new_annotations: int = Field(20, ge=1)
    job_timeout_s: int = Field(7200, ge=1)
    result_ttl_s: int = Field(7 * 24 * 3600, ge=0)
    failure_ttl_s: int = Field(30 * 24 * 3600, ge=0)
    retry_max: int = Field(3, ge=0, le=100)
    retry_intervals_s: tuple[int, ...] = Field((10, 60, 300), min_length=1)
    # Retraining itself (training/): split, schedule, promotion. Documented in default.yaml.
    holdout_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    model: str = "yolo11n.yaml"
    base_epochs: int = Field(50, ge=1)
    finetune_epochs: int = Field(15, ge=1)
    imgsz: int = Field(640, ge=32, le=8192)
    batch: int = Field(16, ge=1, le=1024)
    optimizer: Literal["SGD", "Adam", "Adamax", "AdamW", "NAdam", "RAdam", "RMSProp"] = "AdamW"
    lr0: float = Field(0.002, gt=0.0, le=1.0)
    lr_decay: float = Field(0.7, gt=0.0, le=1.0)
    lr_min: float = Field(0.0001, ge=0.0, le=1.0)
    device: str = "auto"
    workers: int = Field(2, ge=0, le=64)
    seed: int = Field(0, ge=0)
    amp: bool = True
    promote_metric: Literal["mAP50", "mAP50-95", "f1", "precision", "recall"] = "mAP50"
    min_improvement: float = 0.005
    export_page_size: int = Field(100, ge=1, le=1000)
    train_args: dict[str, Any] = Field(default_factory=dict)
    convergence: ConvergenceSettings = ConvergenceSettings()

    @field_validator("retry_intervals_s")
    @classmethod
    def _non_negative(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(i < 0 for i in v):
            raise ValueError("retry intervals must be >= 0 seconds")
        return v


class RankingSettings(_Section):
    uncertainty_weight: float = Field(1.0, ge=0.0)
    class_balance_weight: float = Field(0.5, ge=0.0)
    candidate_multiplier: int = Field(4, ge=1)
    batch_size: int = Field(20, ge=1)
    diverse_batches: int = Field(3, ge=0)
    exploration_fraction: float = Field(0.1, ge=0.0, le=1.0)
    clusters: int = Field(8, ge=1)
    seed: int = Field(0, ge=0)
    selection: Literal["priority", "kcenter"] = "priority"


class SyncSettings(_Section):
    page_size: int = Field(500, ge=1, le=10000)
    batch_size: int = Field(32, ge=1, le=1024)
    import_chunk: int = Field(1000, ge=1, le=100000)
    view_title: str = Field("annoloop: next to label", min_length=1)
    cold_start_version: str = Field("cold-start", pattern=r"^[A-Za-z0-9._-]+$")
    keep_versions: int = Field(1, ge=1)
    after_promotion: bool = True
    ranking: RankingSettings = RankingSettings()


class Settings(_Section):
    label_studio: LabelStudioSettings = LabelStudioSettings()
    redis_url: str = "redis://127.0.0.1:6379/0"
    model_dir: Path = Path("models")
    basic_auth: BasicAuthSettings = BasicAuthSettings()
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    server: ServerSettings = ServerSettings()
    inference: InferenceSettings = InferenceSettings()
    images: ImageSettings = ImageSettings()
    uncertainty: UncertaintySettings = UncertaintySettings()
    training: TrainingSettings = TrainingSettings()
    sync: SyncSettings = SyncSettings()

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, v: str) -> str:
        if urlparse(v).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must be a redis:// URL")
        return v

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise ConfigError(f"{CONFIG_FILE_VAR}: cannot read {path}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must hold a mapping of settings, got {type(data).__name__}")
    return data


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        data = data.setdefault(p, {})
    data[leaf] = value


def _describe(error: ValidationError) -> str:
    lines = []
    for e in error.errors():
        name = ".".join(str(p) for p in e["loc"])
        env = next((k for k, v in ENV_VARS.items() if v == name), None)
        where = f" (env {env})" if env else ""
        got = "" if e["type"] == "extra_forbidden" else f" (got {e.get('input')!r})"
        if isinstance(e.get("input"), SecretStr) or "api_key" in name or "password" in name:
            got = ""
        msg = "unknown setting" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
        lines.append(f"setting {name}{where}: {msg}{got}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def load_settings(
    env: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None
) -> Settings:
    """Build the settings from the three layers; raise ConfigError naming each bad setting."""
    env = os.environ if env is None else env
    data = _read_yaml(DEFAULT_CONFIG)
    if env.get(CONFIG_FILE_VAR):
        data = _merge(data, _read_yaml(Path(env[CONFIG_FILE_VAR])))
    for var, dotted in ENV_VARS.items():
        if env.get(var) not in (None, ""):
            _set_dotted(data, dotted, env[var])
    if overrides:
        data = _merge(data, overrides)
    try:
        return Settings.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_describe(e)) from None
