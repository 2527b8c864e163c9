"""ramp-board's config files: defaults, and a clear message for every mistake."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ramp_dispatcher.config import (
    ConfigError,
    load_event_config,
    load_server_config,
)

SERVER = {
    "sqlalchemy": {
        "drivername": "postgresql",
        "username": "mrramp",
        "password": "secret",
        "host": "localhost",
        "port": 5432,
        "database": "databoard",
    },
    "flask": {"secret_key": "x"},  # ramp-board's own section: ignored silently
}
EVENT = {
    "ramp": {
        "problem_name": "iris",
        "event_name": "iris_test",
        "event_title": "Iris",
        "event_is_public": True,
    },
    "worker": {"worker_type": "conda", "conda_env": "ramp-iris"},
    "dispatcher": {"hunger_policy": "sleep", "n_workers": 2},
}


def write(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


@pytest.fixture
def server(tmp_path: Path):
    return load_server_config(write(tmp_path / "deploy" / "config.yml", SERVER))


def _without(data: dict, section: str, key: str) -> dict:
    copy = {s: dict(v) for s, v in data.items()}
    del copy[section][key]
    return copy


def _with(data: dict, section: str, key: str, value: object) -> dict:
    copy = {s: dict(v) for s, v in data.items()}
    copy.setdefault(section, {})[key] = value
    return copy


def test_server_config_builds_a_psycopg2_url(server) -> None:
    url = server.database_url
    assert url.drivername == "postgresql+psycopg2"
    assert (url.username, url.password, url.host, url.port, url.database) == (
        "mrramp", "secret", "localhost", 5432, "databoard",
    )


def test_relative_sqlite_path_is_relative_to_the_config(tmp_path: Path) -> None:
    cfg = write(tmp_path / "d" / "config.yml", {"sqlalchemy": {"drivername": "sqlite", "database": "ramp.sqlite"}})
    assert load_server_config(cfg).database_url.database == str((tmp_path / "d" / "ramp.sqlite").resolve())


@pytest.mark.parametrize("key", ["drivername", "database"])
def test_server_required_keys(tmp_path: Path, key: str) -> None:
    path = write(tmp_path / "config.yml", _without(SERVER, "sqlalchemy", key))
    with pytest.raises(ConfigError) as err:
        load_server_config(path)
    assert str(path) in str(err.value) and f"'sqlalchemy.{key}' is required" in str(err.value)


def test_server_ill_typed_port(tmp_path: Path) -> None:
    path = write(tmp_path / "config.yml", _with(SERVER, "sqlalchemy", "port", "fivefour"))
    with pytest.raises(ConfigError, match=r"'sqlalchemy.port' must be an integer, got str 'fivefour'"):
        load_server_config(path)


def test_server_missing_section_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="missing section 'sqlalchemy'"):
        load_server_config(write(tmp_path / "a.yml", {"flask": {}}))
    with pytest.raises(ConfigError, match=r"nope\.yml: file not found"):
        load_server_config(tmp_path / "nope.yml")
    with pytest.raises(ConfigError, match=r"bad\.yml: invalid YAML \(line 3, column 1\): expected ','"):
        load_server_config(write(tmp_path / "bad.yml", "sqlalchemy:\n  drivername: [sqlite\n"))
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_server_config(write(tmp_path / "list.yml", "- a\n- b\n"))


def test_event_defaults_follow_ramp_board(server, tmp_path: Path) -> None:
    event = load_event_config(write(tmp_path / "ev.yml", EVENT), server)
    base = tmp_path / "deploy"
    assert event.ramp.kit_dir == base / "ramp-kits" / "iris"
    assert event.ramp.data_dir == base / "ramp-data" / "iris"
    assert event.ramp.submissions_dir == base / "events" / "iris_test" / "submissions"
    assert event.ramp.predictions_dir == base / "events" / "iris_test" / "predictions"
    assert event.ramp.logs_dir == base / "events" / "iris_test" / "logs"
    assert event.ramp.sandbox_name == "starting_kit"
    assert event.worker.conda_env == "ramp-iris" and event.worker.timeout == 7200
    d = event.dispatcher
    assert (d.n_workers, d.hunger_policy, d.time_between_collection, d.max_attempts) == (2, "sleep", 1.0, 3)


def test_negative_n_workers_is_relative_to_cpu_count(server, tmp_path: Path) -> None:
    event = load_event_config(write(tmp_path / "ev.yml", _with(EVENT, "dispatcher", "n_workers", -1)), server)
    assert event.dispatcher.n_workers == os.cpu_count()


@pytest.mark.parametrize("n", [0, "below"])
def test_n_workers_resolving_to_none_is_an_error(server, tmp_path: Path, n) -> None:
    """An explicit 0, or a negative n beyond the CPU count (cpu_count + 1 + n < 1)."""
    value = 0 if n == 0 else -((os.cpu_count() or 1) + 1)
    path = write(tmp_path / "ev.yml", _with(EVENT, "dispatcher", "n_workers", value))
    with pytest.raises(ConfigError) as err:
        load_event_config(path, server)
    assert str(err.value).startswith(f"{path}: key 'dispatcher.n_workers' must give at least one worker")
    # the last negative value that still gives one worker is accepted
    path = write(tmp_path / "ev.yml", _with(EVENT, "dispatcher", "n_workers", -(os.cpu_count() or 1)))
    assert load_event_config(path, server).dispatcher.n_workers == 1


@pytest.mark.parametrize(
    "section,key",
    [
        ("ramp", "problem_name"),
        ("ramp", "event_name"),
        ("ramp", "event_title"),
        ("ramp", "event_is_public"),
        ("worker", "worker_type"),
        ("worker", "conda_env"),
    ],
)
def test_event_required_keys(server, tmp_path: Path, section: str, key: str) -> None:
    path = write(tmp_path / "ev.yml", _without(EVENT, section, key))
    with pytest.raises(ConfigError) as err:
        load_event_config(path, server)
    assert str(err.value) == f"{path}: key '{section}.{key}' is required"


@pytest.mark.parametrize(
    "section,key,value,expected",
    [
        ("ramp", "event_is_public", "yes", "'ramp.event_is_public' must be true or false"),
        ("dispatcher", "n_workers", "two", "'dispatcher.n_workers' must be an integer"),
        ("dispatcher", "n_threads", 0, "'dispatcher.n_threads' must be a positive integer"),
        ("dispatcher", "hunger_policy", "nap", "'dispatcher.hunger_policy' must be one of None, 'sleep', 'exit'"),
        ("dispatcher", "time_between_collection", -1, "'dispatcher.time_between_collection' must be positive"),
        ("worker", "timeout", "long", "'worker.timeout' must be a number of seconds"),
        ("worker", "timeout", 0, "'worker.timeout' must be positive, got 0.0"),
        ("worker", "memory_limit_mb", -5, "'worker.memory_limit_mb' must be positive, got -5.0"),
        ("worker", "conda_env", " ", "'worker.conda_env' must be a non-empty string"),
        ("worker", "worker_type", "kubernetes", "unknown worker type 'kubernetes'"),
    ],
)
def test_event_ill_typed_keys(server, tmp_path: Path, section, key, value, expected) -> None:
    path = write(tmp_path / "ev.yml", _with(EVENT, section, key, value))
    with pytest.raises(ConfigError) as err:
        load_event_config(path, server)
    assert str(path) in str(err.value) and expected in str(err.value)


def test_unknown_keys_warn_naming_file_and_key(server, tmp_path: Path, caplog) -> None:
    data = _with(_with(EVENT, "dispatcher", "n_wokers", 3), "extra", "x", 1)
    path = write(tmp_path / "ev.yml", data)
    with caplog.at_level(logging.WARNING):
        load_event_config(path, server)
    text = caplog.text
    assert f"{path}: unknown key 'dispatcher.n_wokers'" in text
    assert f"{path}: unknown section 'extra'" in text


def test_cli_reports_config_errors_without_traceback(tmp_path: Path) -> None:
    server = write(tmp_path / "config.yml", {"sqlalchemy": {"drivername": "sqlite", "database": "x.sqlite"}})
    event = write(tmp_path / "ev.yml", _without(EVENT, "worker", "conda_env"))
    exe = Path(sys.prefix) / "bin" / "ramp-dispatcher"
    out = subprocess.run(
        [str(exe), "run", "--config", str(server), "--event-config", str(event)],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 2
    assert f"{event}: key 'worker.conda_env' is required" in out.stderr
    assert "Traceback" not in out.stderr


def test_worker_types_come_from_the_registry(server, tmp_path: Path) -> None:
    """The unknown-type error lists the registry's types; the conda worker's
    section is parsed by its own module into its config dataclass."""
    from ramp_dispatcher.workers.conda import CondaConfig
    from ramp_dispatcher.workers.registry import WORKER_TYPES

    path = write(tmp_path / "ev.yml", _with(EVENT, "worker", "worker_type", "kubernetes"))
    with pytest.raises(ConfigError) as err:
        load_event_config(path, server)
    assert f"(known: {', '.join(WORKER_TYPES)})" in str(err.value)
    assert {"conda", "aws", "dask"} <= set(WORKER_TYPES)
    event = load_event_config(write(tmp_path / "ok.yml", EVENT), server)
    assert isinstance(event.worker, CondaConfig) and event.worker.conda_env == "ramp-iris"
    # The dataclass is where the values are checked, with or without a file.
    with pytest.raises(ValueError, match="'timeout' must be positive"):
        CondaConfig(conda_env="ramp-iris", timeout=0)
