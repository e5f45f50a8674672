"""Settings layering and validation messages."""

from __future__ import annotations

import re

import pytest

from config.settings import DEFAULT_CONFIG, ConfigError, load_settings


def test_defaults_load_and_every_setting_is_documented():
    s = load_settings({})
    assert s.inference.prelabel_conf == 0.25
    assert s.inference.uncertainty_conf == 0.05
    assert s.uncertainty.weights.entropy == 1.0
    lines = DEFAULT_CONFIG.read_text().splitlines()
    keys = [i for i, line in enumerate(lines) if re.match(r"^\s*[a-z_]+:", line)]
    assert len(keys) > 30
    for i in keys:
        indent = len(lines[i]) - len(lines[i].lstrip())
        j = i - 1  # a run of sibling keys may share the comment above it
        while j >= 0 and j in keys and len(lines[j]) - len(lines[j].lstrip()) == indent:
            j -= 1
        above = lines[j].strip() if j >= 0 else ""
        is_section = i + 1 < len(lines) and lines[i].rstrip().endswith(":")
        assert above.startswith("#") or is_section, f"setting {lines[i].strip()!r} has no comment"


def test_environment_overrides_file_overrides_defaults(tmp_path):
    f = tmp_path / "o.yaml"
    f.write_text("model_dir: /from/file\ninference:\n  prelabel_conf: 0.4\nredis_url: redis://file:6379/1\n")
    s = load_settings({"ANNOLOOP_CONFIG": str(f), "REDIS_URL": "redis://env:6379/2"})
    assert str(s.model_dir) == "/from/file"  # file beats default
    assert s.inference.prelabel_conf == 0.4
    assert s.inference.iou == 0.7  # untouched keys keep their default
    assert s.redis_url == "redis://env:6379/2"  # env beats file


def test_env_names_match_label_studio_ml():
    s = load_settings(
        {
            "LABEL_STUDIO_URL": "http://ls:8080/",
            "LABEL_STUDIO_API_KEY": "k" * 40,
            "BASIC_AUTH_USER": "u",
            "BASIC_AUTH_PASS": "p",
            "MODEL_DIR": "/m",
            "LOG_LEVEL": "debug",
        }
    )
    assert s.label_studio.url == "http://ls:8080"
    assert s.label_studio.api_key.get_secret_value() == "k" * 40
    assert s.basic_auth.enabled and s.basic_auth.password.get_secret_value() == "p"
    assert s.log_level == "DEBUG"
    assert "k" * 40 not in repr(s) and "k" * 40 not in str(s.model_dump())


@pytest.mark.parametrize(
    ("env", "file", "named"),
    [
        ({"LABEL_STUDIO_URL": "localhost:8080"}, None, "label_studio.url (env LABEL_STUDIO_URL)"),
        ({"REDIS_URL": "http://x"}, None, "redis_url (env REDIS_URL)"),
        ({}, "inference:\n  prelabel_conf: 1.5\n", "inference.prelabel_conf"),
        ({}, "uncertainty:\n  weights:\n    entropy: -1\n", "uncertainty.weights.entropy"),
        ({}, "uncertainty:\n  aggregation: median\n", "uncertainty.aggregation"),
        ({}, "inference:\n  prelabel_cnf: 0.3\n", "inference.prelabel_cnf: unknown setting"),
        ({}, "server:\n  port: 0\n", "server.port"),
        ({}, "- a list\n", "must hold a mapping"),
        ({}, "a: [unclosed\n", "not valid YAML"),
    ],
)
def test_invalid_settings_name_the_setting(tmp_path, env, file, named):
    if file is not None:
        f = tmp_path / "bad.yaml"
        f.write_text(file)
        env = {**env, "ANNOLOOP_CONFIG": str(f)}
    with pytest.raises(ConfigError) as e:
        load_settings(env)
    assert named in str(e.value)


def test_missing_config_file_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"ANNOLOOP_CONFIG: cannot read /nonexistent\.yaml"):
        load_settings({"ANNOLOOP_CONFIG": "/nonexistent.yaml"})


def test_secret_values_never_appear_in_errors(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("basic_auth:\n  password: [1, 2]\n")
    with pytest.raises(ConfigError) as e:
        load_settings({"ANNOLOOP_CONFIG": str(f)})
    assert "basic_auth.password" in str(e.value)
    assert "[1, 2]" not in str(e.value)
