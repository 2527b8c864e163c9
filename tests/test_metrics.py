"""Prometheus metrics: the text format parsed back, and a real HTTP scrape."""

from __future__ import annotations

import re
import threading
import time
import urllib.error
import urllib.request

import pytest

from ramp_dispatcher.metrics import CONTENT_TYPE, OUTCOMES, Metrics, outcome_label

# name{labels} value   (labels: key="value" with \\, \" and \n escaped)
SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)\{(.*)\} (\S+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(?:,|$)')


def parse(text: str) -> tuple[dict[str, tuple[str, str]], list[tuple[str, dict[str, str], float]]]:
    """Families (name -> (type, help)) and samples; asserts the format's rules."""
    assert text.endswith("\n")
    families: dict[str, tuple[str, str]] = {}
    helps: dict[str, str] = {}
    samples = []
    for line in text.rstrip("\n").split("\n"):
        assert line, "no blank lines"
        if line.startswith("# HELP "):
            name, help_ = line[7:].split(" ", 1)
            helps[name] = help_
        elif line.startswith("# TYPE "):
            name, kind = line[7:].split(" ")
            assert kind in ("counter", "gauge", "histogram")
            assert name in helps, "HELP before TYPE"
            assert name not in families, "one TYPE line per family"
            families[name] = (kind, helps[name])
        else:
            m = SAMPLE.match(line)
            assert m, line
            name, raw_labels, value = m.groups()
            labels = {}
            pos = 0
            for lm in LABEL.finditer(raw_labels):
                assert lm.start() == pos, raw_labels
                labels[lm.group(1)] = re.sub(r"\\(.)", lambda x: {"n": "\n"}.get(x.group(1), x.group(1)), lm.group(2))
                pos = lm.end()
            assert pos == len(raw_labels), raw_labels
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            family = name if name in families else base
            assert family in families, f"sample {name} before its TYPE"
            samples.append((name, labels, float(value)))
    return families, samples


def value(samples, name: str, **labels: str) -> float:
    found = [v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items())]
    assert len(found) == 1, (name, labels, found)
    return found[0]


def test_render_parses_back() -> None:
    m = Metrics("iris_test")
    m.set_queue_depth(7)
    m.set_running(2)
    for label in ("scored", "scored", "participant", "infrastructure", "cancelled"):
        m.outcome(label)
    for seconds in (0.5, 3, 3, 70, 10_000):
        m.observe_duration(seconds)
    m.loop_ok(at=1_700_000_000.5)

    families, samples = parse(m.render())
    assert all(name.startswith("ramp_dispatcher_") for name in families)
    assert all(labels.get("event") == "iris_test" for _, labels, _ in samples)
    assert families["ramp_dispatcher_queue_depth"][0] == "gauge"
    assert families["ramp_dispatcher_run_outcomes_total"][0] == "counter"
    assert families["ramp_dispatcher_run_duration_seconds"][0] == "histogram"

    assert value(samples, "ramp_dispatcher_queue_depth") == 7
    assert value(samples, "ramp_dispatcher_running_runs") == 2
    outcomes = {lab["outcome"]: v for n, lab, v in samples if n == "ramp_dispatcher_run_outcomes_total"}
    assert outcomes == {
        "scored": 2, "participant": 1, "timeout": 0, "memory": 0, "infrastructure": 1,
        "configuration": 0, "cancelled": 1,
    }
    assert set(outcomes) == set(OUTCOMES)

    buckets = [(lab["le"], v) for n, lab, v in samples if n == "ramp_dispatcher_run_duration_seconds_bucket"]
    assert buckets == [
        ("1", 1), ("5", 3), ("15", 3), ("60", 3), ("300", 4), ("900", 4), ("3600", 4),
        ("7200", 4), ("+Inf", 5),
    ]
    counts = [v for _, v in buckets]
    assert counts == sorted(counts)  # cumulative
    assert value(samples, "ramp_dispatcher_run_duration_seconds_count") == 5
    assert value(samples, "ramp_dispatcher_run_duration_seconds_sum") == pytest.approx(10_076.5)
    assert value(samples, "ramp_dispatcher_last_successful_loop_timestamp_seconds") == 1_700_000_000.5


def test_fresh_metrics_and_label_escaping() -> None:
    m = Metrics('odd "event"\\name\nx')
    families, samples = parse(m.render())
    assert all(labels["event"] == 'odd "event"\\name\nx' for _, labels, _ in samples)
    assert value(samples, "ramp_dispatcher_last_successful_loop_timestamp_seconds") == 0
    assert value(samples, "ramp_dispatcher_run_duration_seconds_bucket", le="+Inf") == 0
    assert value(samples, "ramp_dispatcher_start_time_seconds") == pytest.approx(time.time(), abs=60)
    with pytest.raises(ValueError, match="unknown outcome 'weird'"):
        m.outcome("weird")
    assert outcome_label(None) == "scored" and outcome_label("timeout") == "timeout"


def test_updates_are_thread_safe() -> None:
    m = Metrics("e")

    def hammer() -> None:
        for _ in range(2000):
            m.outcome("scored")
            m.observe_duration(2)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _, samples = parse(m.render())
    assert value(samples, "ramp_dispatcher_run_outcomes_total", outcome="scored") == 16000
    assert value(samples, "ramp_dispatcher_run_duration_seconds_count") == 16000
    assert value(samples, "ramp_dispatcher_run_duration_seconds_bucket", le="5") == 16000


def test_http_scrape_over_loopback() -> None:
    m = Metrics("iris_test")
    port = m.serve(0)  # any free port
    try:
        m.set_queue_depth(3)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == CONTENT_TYPE
            body = resp.read().decode()
        _, samples = parse(body)
        assert value(samples, "ramp_dispatcher_queue_depth") == 3

        m.set_queue_depth(4)  # live values, not a snapshot from start-up
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics?x=1", timeout=5) as resp:
            assert value(parse(resp.read().decode())[1], "ramp_dispatcher_queue_depth") == 4

        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5)
        assert err.value.code == 404
        with pytest.raises(RuntimeError):
            m.serve(0)
    finally:
        m.close()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
    m.close()  # twice is fine


def test_port_in_use_is_a_clear_error() -> None:
    from ramp_dispatcher.errors import UserError

    first = Metrics("a")
    port = first.serve(0)
    try:
        with pytest.raises(UserError, match=f"cannot listen on 127.0.0.1:{port}.*own metrics_port"):
            Metrics("b").serve(port)
    finally:
        first.close()
