"""Config: the original form, the extended form, the environment, and clear errors."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from opt_queue.core.config import Limits, Window, fingerprint, load_config
from opt_queue.core.errors import ConfigError

SECRET = "sk-abcdefghijklmnopqrstuvwxyz0123456789"


def write(tmp_path: Path, data: object, mode: int = 0o600) -> Path:
    p = tmp_path / "config.json"
    p.write_text(json.dumps(data) if not isinstance(data, str) else data, encoding="utf-8")
    os.chmod(p, mode)
    return p


def test_original_seed_form_loads_and_leaves_the_limits_to_discovery(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, {"api_keys": [SECRET, "sk-2"], "api_base": ""}), env={})
    keys = cfg.keys()
    assert [k.api_base for k in keys] == ["https://api.openai.com/v1"] * 2
    assert keys[0].limits == Limits() and cfg.header_period == 60.0  # nothing typed: read from headers
    assert cfg.model.name == "gpt-3.5-turbo-0613" and cfg.max_retries == 5


def test_extended_form_per_key_overrides_replace_windows_of_the_same_period(tmp_path: Path) -> None:
    data = {"api_keys": ["sk-a", {"key": "sk-b", "api_base": "https://proxy/v1/", "rpm": 500,
                                  "tpm": 200000, "rpd": 10000, "models": ["gpt-4o-mini"], "group": "org1"}],
            "limits": {"rpm": 3, "tpm": 40000, "rpd": 200},
            "model": {"name": "gpt-4o-mini", "temperature": 0.1, "fallback": "gpt-4o"}}
    a, b = load_config(write(tmp_path, data), env={}).keys()
    assert str(a.limits) == "3/min req, 200/day req, 40000/min tok"
    assert {str(w) for w in b.limits.requests} == {"500/min", "10000/day"}
    assert b.api_base == "https://proxy/v1" and b.serves("gpt-4o-mini") and not b.serves("gpt-4o")
    assert b.bucket == "group-org1" and a.bucket == a.fingerprint


def test_general_limit_form_takes_any_windows() -> None:
    limits = Limits.model_validate({"requests": ["3/min", "200/day", "10/s", "600/10s"], "tokens": ["40000/min"]})
    assert [(w.limit, w.period) for w in limits.requests] == [(3, 60), (200, 86400), (10, 1), (600, 10)]
    assert Window.parse("5/1.5s").period == 1.5 and Window.parse("7/h").period == 3600


@pytest.mark.parametrize("bad", ["3", "3/fortnight", "x/min", "0/min"])
def test_bad_window_is_rejected(bad: str) -> None:
    with pytest.raises(ValueError):
        Limits.model_validate({"requests": [bad]})


def test_keys_from_environment_join_the_file_and_broker_env_wins(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, {"api_keys": ["sk-file"], "broker_url": "redis://a:1/0"}),
                      env={"OPT_QUEUE_API_KEYS": "sk-env1, sk-env2", "OPT_QUEUE_BROKER_URL": "redis://b:2/0"})
    assert len(cfg.keys()) == 3 and cfg.broker_url == "redis://b:2/0"
    assert load_config(None, env={"OPT_QUEUE_API_KEYS": "sk-only"}).keys()[0].fingerprint == fingerprint("sk-only")


@pytest.mark.parametrize("data, field, fix", [
    ({"api_keys": "sk-x"}, "api_keys:", "valid list"),
    ({"api_keys": ["sk-x"], "limits": {"rpm": -1}}, "limits", "greater than or equal to 1"),
    ({"api_keys": ["sk-x"], "max_retries": "many"}, "max_retries:", "integer"),
    ({"api_keys": ["sk-x"], "colour": "red"}, "colour:", "check its spelling"),
    ({"api_keys": [{"key": "sk-x", "rpm": 0}]}, "api_keys[0].rpm:", "greater than or equal to 1"),
    ({"api_keys": [{"key": "sk-x", "rpmm": 5}]}, "api_keys[0].rpmm:", "check its spelling"),
    ({"api_keys": [5]}, "api_keys[0]:", 'an object such as {"key"'),
    ({"api_keys": ["sk-x"], "api_base": "notaurl"}, "api_base:", "is not an http(s) URL"),
    ({"api_keys": [{"key": "sk-x", "api_base": "ftp://h/v1"}]}, "api_keys[0].api_base:", "http(s) URL"),
    ({"api_keys": ["sk-x"], "state_ttl": "a week"}, "state_ttl:", "such as '7d'"),
])
def test_invalid_config_is_one_line_naming_the_field_and_the_fix(tmp_path: Path, data: dict, field: str,
                                                                  fix: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, data), env={})
    text = str(err.value)
    assert field in text and fix in text and "\n" not in text
    for internal in ("lax-or-strict", "function-after", "json-or-python", "KeyConfig", "SecretStr"):
        assert internal not in text  # pydantic's inner names are not the user's


def test_durations_and_urls_that_are_fine(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, {"api_keys": [{"key": "sk-x", "api_base": "http://127.0.0.1:8/v1"}],
                                       "state_ttl": "12h", "api_base": ""}), env={})
    assert cfg.state_ttl == 43200 and cfg.keys()[0].api_base == "http://127.0.0.1:8/v1"
    assert load_config(write(tmp_path, {"api_keys": ["k"], "state_ttl": 0}), env={}).state_ttl == 0


def test_no_keys_and_bad_json_and_missing_file_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no API key"):
        load_config(write(tmp_path, {"api_base": "https://proxy.example/v1"}), env={})
    with pytest.raises(ConfigError, match=r"config.json:1: not valid JSON"):
        load_config(write(tmp_path, "{nope"), env={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.json", env={})


def test_secrets_never_appear_in_repr_errors_or_fingerprint(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, {"api_keys": [SECRET], "broker_url": "redis://:hunter2@h:1/0"}),
                      env={})
    key = cfg.keys()[0]
    assert SECRET not in repr(cfg) and SECRET not in repr(key) and SECRET not in str(cfg.model_dump())
    assert "hunter2" not in repr(cfg)
    assert SECRET[3:11] not in key.fingerprint and key.fingerprint.startswith("key-")
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, {"api_keys": [{"key": SECRET, "rpm": 0}]}), env={})
    assert SECRET not in str(err.value)


def test_world_readable_config_with_keys_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        load_config(write(tmp_path, {"api_keys": [SECRET]}, mode=0o644), env={})
    assert "chmod 600" in caplog.text and SECRET not in caplog.text


def test_limits_per_model_and_per_group(tmp_path: Path) -> None:
    data = {"api_keys": ["sk-a", {"key": "sk-b", "models": {"gpt-4o": {"rpm": 50}}}, {"key": "sk-c", "group": "org"}],
            "limits": {"rpd": 1000}, "models": {"gpt-4o": {"rpm": 500, "tpm": 30000}, "gpt-4o-mini": {"rpm": 5000}},
            "groups": {"org": {"rpm": 20, "models": {"gpt-4o-mini": {"rpm": 900}}, "keys": ["sk-d"]}}}
    a, b, c, d = load_config(write(tmp_path, data), env={}).keys()
    assert str(a.limits_for("gpt-4o")) == "500/min req, 1000/day req, 30000/min tok"
    assert str(a.limits_for("other")) == "1000/day req"
    assert str(b.limits_for("gpt-4o")) == "50/min req, 1000/day req, 30000/min tok"  # the key's own
    assert b.serves("gpt-4o") and not b.serves("gpt-4o-mini")  # a mapping of models also restricts
    assert c.bucket == d.bucket == "group-org"  # named by the group, or naming it
    assert str(c.limits_for("gpt-4o-mini")) == "900/min req, 1000/day req"
    assert str(d.limits_for("x")) == "20/min req, 1000/day req"


@pytest.mark.parametrize(("data", "needle"), [
    ({"api_keys": [{"key": "sk-a", "group": "org", "rpm": 5}], "groups": {"org": {"rpm": 9}}},
     "api_keys[0]: a key of group 'org' shares the group's budget; put its limits on groups.org"),
    ({"api_keys": ["sk-a"], "groups": {"org": {"keys": ["key-00000000"]}}},
     "groups.org.keys[0]: no key in api_keys has fingerprint key-00000000"),
    ({"api_keys": ["sk-a"], "models": {"gpt-4o": {"rpn": 5}}}, "models"),
    ({"api_keys": ["sk-a"], "default_limits": {"rpd": 5}}, "default_limits: give windows of the header period"),
    ({"api_keys": ["sk-a"], "header_period": "soon"}, "header_period: 'soon' is not a duration"),
])
def test_bad_limit_settings_name_the_field_and_the_fix(tmp_path: Path, data: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, data), env={})
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_a_deadline_means_the_batch_lane_and_conflicts_are_refused_with_the_fix(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, {"api_keys": [SECRET], "deadline": "6h"}), env={})
    assert cfg.lane == "batch" and cfg.deadline == 6 * 3600
    with pytest.raises(ConfigError, match="a deadline is for the batch lane"):
        load_config(write(tmp_path, {"api_keys": [SECRET], "deadline": "6h", "lane": "flex"}), env={})
    with pytest.raises(ConfigError, match="batch_max_lines"):
        load_config(write(tmp_path, {"api_keys": [SECRET], "batch_max_lines": 60000}), env={})
