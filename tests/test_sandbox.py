"""The bubblewrap sandbox of the conda worker: argv, environment, real runs.

The argv tests need nothing; the runs need ``bwrap`` (./dev test installs
it). Without it they skip, unless RAMP_DISPATCHER_REQUIRE_SANDBOX=1 (CI),
where they fail.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from ramp_dispatcher.config import ConfigError, Section
from ramp_dispatcher.results import parse_training_output
from ramp_dispatcher.trusted_scores import read_results
from ramp_dispatcher.workers import sandbox as sb
from ramp_dispatcher.workers.base import FailureClass, RunRequest
from ramp_dispatcher.workers.conda import CondaConfig, CondaWorker, sandbox_settings
from ramp_dispatcher.workers.sandbox import SandboxError

sys.path.insert(0, str(Path(__file__).parent))
import kit  # noqa: E402
from helpers import recording_listener  # noqa: E402
from sandbox_attacks import denied, probe_classifier, probe_results  # noqa: E402

VENV = Path(sys.prefix)


def require_bwrap() -> None:
    try:
        sb.check_bwrap(sb.find_bwrap())
    except SandboxError as exc:
        if os.environ.get("RAMP_DISPATCHER_REQUIRE_SANDBOX") == "1":
            pytest.fail(f"the sandbox cannot run here: {exc}")
        pytest.skip(f"the sandbox cannot run here: {exc}")


# ---------------------------------------------------------------- pure parts
def spec(tmp_path: Path, **kw: object) -> sb.SandboxSpec:
    subs = tmp_path / "subs"
    values: dict[str, object] = dict(
        python_roots=(Path("/opt/env"), Path("/opt/base")),
        kit_dir=tmp_path / "kit",
        data_dir=tmp_path / "data",
        submission_dir=subs / "submission_000000001",
        output_dir=subs / "submission_000000001" / "training_output",
        hidden=(subs,),
        system=(("/usr", "dir"), ("/bin", "usr/bin"), ("/etc/ld.so.cache", "file")),
    )
    values.update(kw)
    return sb.SandboxSpec(**values)  # type: ignore[arg-type]


def test_argv_isolates_by_default(tmp_path: Path) -> None:
    argv = sb.bwrap_argv(spec(tmp_path), ["ramp-test", "--submission", "x"])
    assert argv[0] == "bwrap" and argv[-3:] == ["ramp-test", "--submission", "x"]
    for flag in ("--unshare-all", "--die-with-parent", "--new-session"):
        assert flag in argv
    assert "--share-net" not in argv
    assert argv[argv.index("--cap-drop") + 1] == "ALL"
    assert argv[argv.index("--proc") + 1] == "/proc" and argv[argv.index("--dev") + 1] == "/dev"
    pairs = list(zip(argv, argv[1:], argv[2:]))
    ro = {a for flag, a, b in pairs if flag == "--ro-bind" and a == b}
    rw = [a for flag, a, b in pairs if flag == "--bind"]
    out = str(tmp_path / "subs" / "submission_000000001" / "training_output")
    assert rw == [out], "the run's output folder is the only writable host folder"
    assert {"/opt/env", "/opt/base", str(tmp_path / "kit"), str(tmp_path / "data")} <= ro
    assert str(tmp_path / "subs") not in ro, "other submissions are never bound"
    assert "/etc" not in ro and not any(p.startswith("/home") or p == "/root" for p in ro)
    # the private /tmp comes first (capped), the run's output last
    assert argv.index("--tmpfs") < argv.index("--ro-bind")
    assert argv[argv.index("--tmpfs") - 2 : argv.index("--tmpfs")] == ["--size", str(512 * 2**20)]
    assert argv.index("--bind") > max(i for i, a in enumerate(argv) if a == "--ro-bind")
    assert ["--symlink", "usr/bin", "/bin"] == argv[argv.index("--symlink") : argv.index("--symlink") + 3]


def test_argv_network_and_hidden_folders_below_the_kit(tmp_path: Path) -> None:
    kit_dir = tmp_path / "kit"
    subs = kit_dir / "submissions-of-the-event"  # a deployment that nests them
    (subs / "submission_000000001" / "training_output").mkdir(parents=True)
    (kit_dir / "config.yml").write_text("secret")
    argv = sb.bwrap_argv(
        spec(
            tmp_path, kit_dir=kit_dir, submission_dir=subs / "submission_000000001",
            output_dir=subs / "submission_000000001" / "training_output",
            hidden=(subs, kit_dir / "config.yml", tmp_path / "absent"), allow_network=True,
        ),
        ["true"],
    )
    assert "--share-net" in argv
    text = " ".join(argv)
    # covered by a read-only empty folder, then the own submission on top of it
    assert f"--perms 0555 --tmpfs {subs} " in text
    assert text.index(f"--tmpfs {subs} ") < text.index(f"--ro-bind {subs}/submission_000000001 ")
    assert text.index(f"--ro-bind {subs}/submission_000000001 ") < text.index(f"--remount-ro {subs} ")
    assert f"--ro-bind /dev/null {kit_dir / 'config.yml'}" in text
    assert "absent" not in text


def test_environment_is_an_allow_list(tmp_path: Path) -> None:
    host = {
        "PATH": "/secret/bin", "HOME": "/home/ramp", "AWS_SECRET_ACCESS_KEY": "s3cr3t",
        "PGPASSWORD": "pw", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "64",
    }  # fmt: skip
    env = sb.sandbox_env(spec(tmp_path, n_threads=2, run_env={"KIT_MODE": "fast"}), host)
    assert env == {
        "PATH": "/opt/env/bin:/usr/local/bin:/usr/bin:/bin",
        "HOME": "/tmp", "TMPDIR": "/tmp", "PYTHONUNBUFFERED": "1",
        "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
        "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2",
        "KIT_MODE": "fast",
    }  # fmt: skip


def test_python_roots_follow_a_venv_to_its_base_interpreter() -> None:
    roots = sb.python_roots(VENV)
    assert roots[0] == VENV
    base = Path(sys.base_prefix).resolve()
    assert any(base == r or r in base.parents for r in roots), roots


def test_a_workers_python_roots_are_looked_up_again_after_env_cache_s(tmp_path: Path, monkeypatch) -> None:
    """A run's start reuses the environment's python_roots (reading them costs
    about half a millisecond) for ``env_cache_s``, as the environment's own
    lookup; another prefix, or the time passed, looks again."""
    calls: list[Path] = []
    real = sb.python_roots

    def counted(prefix: Path) -> tuple[Path, ...]:
        calls.append(prefix)
        return real(prefix)

    monkeypatch.setattr(sb, "python_roots", counted)
    worker = CondaWorker(CondaConfig(conda_env=str(VENV), env_cache_s=0.5))
    first = worker._python_roots(VENV)
    assert first == real(VENV) and worker._python_roots(VENV) is first and calls == [VENV]
    other = tmp_path / "env"
    other.mkdir()
    assert worker._python_roots(other) == real(other) and calls == [VENV, other]
    time.sleep(0.6)
    worker._python_roots(other)
    assert calls == [VENV, other, other]


def test_rlimit_args() -> None:
    args = sb.rlimit_args(sb.Limits(max_processes=64, max_open_files=None, max_file_size_mb=1))
    assert args == ["--rlimit", "NPROC=64", "--rlimit", "FSIZE=1048576"]


def test_config_keys(tmp_path: Path) -> None:
    path = tmp_path / "config.yml"
    settings = sandbox_settings(Section(path, "worker", {
        "sandbox": "none", "allow_network": True, "run_env": {"A": "1", "B": 2},
        "max_processes": 32, "tmp_size_mb": 64, "verify_scores": False,
    }))  # fmt: skip
    assert settings["sandbox"] == "none" and settings["allow_network"] is True
    assert settings["run_env"] == {"A": "1", "B": "2"} and settings["verify_scores"] is False
    assert settings["limits"].max_processes == 32 and settings["limits"].tmp_size_mb == 64
    assert settings["limits"].max_open_files == sb.DEFAULT_LIMITS.max_open_files
    assert settings["config_path"] == path
    defaults = sandbox_settings(Section(path, "worker", {}))
    assert defaults["sandbox"] == "bwrap" and defaults["verify_scores"] is True
    for bad, key in (
        ({"sandbox": "docker"}, "worker.sandbox"),
        ({"run_env": ["A=1"]}, "worker.run_env"),
        ({"max_processes": 0}, "worker.max_processes"),
        ({"allow_network": "yes"}, "worker.allow_network"),
    ):
        with pytest.raises(ConfigError, match=rf"{path}: key '{key}'"):
            sandbox_settings(Section(path, "worker", bad))


def test_missing_bwrap_is_a_start_up_error_naming_file_and_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(sb, "find_bwrap", lambda: None)
    cfg = tmp_path / "events" / "e" / "config.yml"
    worker = CondaWorker(CondaConfig(conda_env=str(VENV), config_path=cfg))
    with pytest.raises(SandboxError, match=rf"{cfg}: key 'worker.sandbox'.*bubblewrap \(bwrap\) is not installed"):
        worker.validate()
    # the explicit opt-out starts, and says so
    CondaWorker(CondaConfig(conda_env=str(VENV), sandbox="none", config_path=cfg)).validate()
    assert "WITHOUT a sandbox" in caplog.text and "key 'worker.sandbox'" in caplog.text


# ---------------------------------------------------------------- real runs
@pytest.fixture(scope="module")
def iris_kit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_bwrap()
    return kit.make_iris_kit(tmp_path_factory.mktemp("sandbox_kit"))


@pytest.fixture
def listener() -> Iterator[tuple[int, list[bytes]]]:
    """A TCP listener on 127.0.0.1 that records whatever reaches it."""
    with recording_listener() as port_and_got:
        yield port_and_got


_ids = iter(range(1, 10**6))


def request_for(tmp_path: Path, kit_dir: Path, source: str, n_threads: int | None = None) -> RunRequest:
    sid = next(_ids)
    name = f"submission_{sid:09d}"
    kit.add_submission_files(kit_dir, name, source, submissions_dir=tmp_path / "submissions")
    return RunRequest(
        submission_id=sid, submission_name=name, attempt=1, kit_dir=kit_dir, data_dir=kit_dir,
        submissions_dir=tmp_path / "submissions", logs_dir=tmp_path / "logs",
        predictions_dir=tmp_path / "predictions", n_threads=n_threads,
    )  # fmt: skip


def run(worker: CondaWorker, request: RunRequest, limit: float = 120.0):
    handle = worker.start(request, lambda: None)
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        outcome = worker.check(request, handle)
        if outcome is not None:
            return outcome, handle
        time.sleep(0.1)
    raise AssertionError(f"no outcome within {limit} s")


def test_run_sees_only_what_it_needs(iris_kit: Path, tmp_path: Path, listener, monkeypatch) -> None:
    port, got = listener
    secret = tmp_path / "config.yml"
    secret.write_text("sqlalchemy:\n  password: hunter2\n")
    monkeypatch.setenv("RAMP_SECRET_TOKEN", "hunter2")
    other = request_for(tmp_path, iris_kit, kit.GOOD)  # another team's submission
    (tmp_path / "predictions" / other.submission_name).mkdir(parents=True)
    probe = f"""
        import socket, pathlib
        me = _os.path.abspath(_os.path.join(_os.getcwd(), "."))
        attempt("env", lambda: sorted(_os.environ))
        attempt("home", lambda: _os.environ["HOME"])
        attempt("threads", lambda: _os.environ["OMP_NUM_THREADS"])
        attempt("read_secret", lambda: read({str(secret)!r}))
        attempt("read_other", lambda: read({str(other.submissions_dir / other.submission_name / 'classifier.py')!r}))
        attempt("list_submissions", lambda: listing({str(tmp_path / 'submissions')!r}))
        attempt("list_predictions", lambda: listing({str(tmp_path / 'predictions')!r}))
        attempt("read_kit", lambda: read({str(iris_kit / 'problem.py')!r}))
        attempt("write_kit", lambda: write({str(iris_kit / 'problem.py')!r}))
        attempt("write_tmp", lambda: write("/tmp/scratch"))
        attempt("tcp", lambda: socket.create_connection(("127.0.0.1", {port}), timeout=3))
        attempt("etc", lambda: listing("/etc"))
        attempt("proc", lambda: [p for p in listing("/proc") if p.isdigit()])
        attempt("root_home", lambda: listing("/root"))
        report("look")
    """
    worker = CondaWorker(CondaConfig(conda_env=str(VENV), timeout=120, run_env={"KIT_MODE": "x"}))
    request = request_for(tmp_path, iris_kit, probe_classifier(probe, kit.GOOD), n_threads=2)
    outcome, _ = run(worker, request)
    assert outcome.failure is None, (outcome, request.log_path.read_text()[-2000:])
    r = probe_results(request.log_path.read_text(), "look")
    # PWD comes from bwrap's --chdir, KMP_* from scikit-learn's own import
    env = {v for v in eval(r["env"].removeprefix("ok: ")) if v != "PWD" and not v.startswith("KMP_")}
    assert env <= {"PATH", "HOME", "TMPDIR", "PYTHONUNBUFFERED", "LANG", "LC_ALL", "LC_CTYPE",
                   "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "KIT_MODE"}, env
    assert "KIT_MODE" in env and r["home"] == "ok: '/tmp'" and r["threads"] == "ok: '2'"
    for name in ("read_secret", "read_other", "list_predictions", "write_kit", "tcp"):
        assert denied(r, name), (name, r[name])
    # a home folder shows only the way to an interpreter that lives there (pyenv)
    via = sorted({p.parts[2] for p in sb.python_roots(VENV) if p.parts[1:2] == ("root",)})
    assert denied(r, "root_home") or r["root_home"] == f"ok: {via!r}", r["root_home"]
    assert r["list_submissions"] == f"ok: [{request.submission_name!r}]"
    assert r["read_kit"].startswith("ok: b'import os") and r["write_tmp"] == "ok: 'written'"
    etc = eval(r["etc"].removeprefix("ok: "))
    assert "passwd" not in etc and "shadow" not in etc and "ssh" not in etc, etc
    assert len(eval(r["proc"].removeprefix("ok: "))) < 10, "a private PID namespace"
    assert got == [], "nothing reached the host's listener"
    assert "hunter2" not in request.log_path.read_text()
    worker.cleanup(request, {})


def test_tree_stopped_at_timeout_inside_the_sandbox(iris_kit: Path, tmp_path: Path) -> None:
    marker = f"ramp-sandbox-test-{os.getpid()}-{time.monotonic_ns()}"
    probe = f"""
        import importlib, time
        sp = importlib.import_module("sub" + "process")
        # escapes the run's process group, as a daemonising helper would
        getattr(sp, "Po" + "pen")(["sh", "-c", "sleep 300; : {marker}"], start_new_session=True)
        time.sleep(300)
    """
    worker = CondaWorker(CondaConfig(conda_env=str(VENV), timeout=8))
    request = request_for(tmp_path, iris_kit, probe_classifier(probe, kit.GOOD))
    outcome, handle = run(worker, request, limit=60)
    assert outcome.failure is FailureClass.TIMEOUT, outcome
    assert outcome.message == "Training stopped: the time limit of 8 s was reached."

    def leftovers() -> list[str]:
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(pid)
            except OSError:
                pass
        return found

    deadline = time.monotonic() + 10
    while leftovers() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not leftovers()
    worker.cleanup(request, handle)


def test_limits_file_size_and_tmp(iris_kit: Path, tmp_path: Path) -> None:
    """(The process count is tested in test_hostile, as a non-root user: the
    kernel never applies RLIMIT_NPROC to root.)"""
    probe = """
        attempt("big_file", lambda: write("/tmp/big", b"x" * (3 * 2**20)))
        def fill():
            for i in range(40):
                write(f"/tmp/part{i}", b"x" * (2**20))
        attempt("fill_tmp", fill)
        report("limits")
    """
    limits = sb.Limits(max_file_size_mb=2, tmp_size_mb=16)
    worker = CondaWorker(CondaConfig(conda_env=str(VENV), timeout=120, limits=limits))
    request = request_for(tmp_path, iris_kit, probe_classifier(probe, kit.GOOD))
    outcome, _ = run(worker, request)
    r = probe_results(request.log_path.read_text(), "limits")
    assert r["big_file"].startswith("denied: OSError: [Errno 27] File too large"), r
    assert r["fill_tmp"].startswith("denied: OSError: [Errno 28] No space left on device"), r
    assert outcome.failure is None, outcome  # the submission caught both; it still trains


def test_forged_scores_are_replaced_by_recomputed_ones(iris_kit: Path, tmp_path: Path) -> None:
    """The submission patches rampwf's accuracy to 1.0 and its fold-0 scores.csv;
    the scores stored are computed outside the sandbox from its predictions."""
    probe = """
        import rampwf.score_types.accuracy as acc
        acc.Accuracy.__call__ = lambda self, y_true, y_pred: 1.0
        import rampwf.score_types.negative_log_likelihood as nll
        nll.NegativeLogLikelihood.__call__ = lambda self, y_true, y_pred: 0.0
    """
    weak = kit.GOOD.replace("LogisticRegression(max_iter=500)", "LogisticRegression(max_iter=1, C=1e-4)")
    worker = CondaWorker(CondaConfig(conda_env=str(VENV), timeout=120))
    request = request_for(tmp_path, iris_kit, probe_classifier(probe, weak))
    outcome, _ = run(worker, request)
    assert outcome.failure is None and outcome.trusted_scores is not None, outcome
    reported = parse_training_output(request.output_dir, 2, kit.SCORE_NAMES)
    assert reported.bagged.last["acc"]["test"] == 1.0  # what the run claims
    results, note = read_results(request.output_dir, 2, kit.SCORE_NAMES, outcome.trusted_scores)
    assert results.bagged.last["acc"]["test"] < 0.9
    assert results.folds[0].scores["nll"]["valid"] > 0.5
    assert results.folds[1].train_time == reported.folds[1].train_time  # times: the run's own
    assert note.startswith("scores recomputed outside the sandbox differ from what the run reported")
    assert "bagged test acc: reported 1, recomputed" in note


def test_honest_run_is_unchanged_by_rescoring(iris_kit: Path, tmp_path: Path) -> None:
    worker = CondaWorker(CondaConfig(conda_env=str(VENV), timeout=120))
    request = request_for(tmp_path, iris_kit, kit.GOOD)
    outcome, _ = run(worker, request)
    assert outcome.trusted_scores is not None
    reported = parse_training_output(request.output_dir, 2, kit.SCORE_NAMES)
    results, note = read_results(request.output_dir, 2, kit.SCORE_NAMES, outcome.trusted_scores)
    assert note == "" and results == reported


def test_links_and_fifos_in_the_output_are_removed(iris_kit: Path, tmp_path: Path) -> None:
    probe = f"""
        import sys
        out = [a for a in sys.argv if a.endswith("submissions")][0]
        me = [a for a in sys.argv if a.startswith("submission_")][0]
        fold = _os.path.join(out, me, "training_output", "fold_0")
        _os.makedirs(fold, exist_ok=True)
        link = _os.path.join(fold, "error.txt")
        fifo = _os.path.join(out, me, "training_output", "bagged_scores.csv.x")
        # (ramp-test imports the submission once per fold)
        attempt("link", lambda: _os.path.lexists(link) or _os.symlink({str(tmp_path / 'host-secret')!r}, link))
        attempt("fifo", lambda: _os.path.lexists(fifo) or _os.mkfifo(fifo))
        report("plant")
    """
    (tmp_path / "host-secret").write_text("hunter2")
    worker = CondaWorker(CondaConfig(conda_env=str(VENV), timeout=120))
    request = request_for(tmp_path, iris_kit, probe_classifier(probe, kit.GOOD))
    outcome, _ = run(worker, request)
    r = probe_results(request.log_path.read_text(), "plant")
    assert r["link"].startswith("ok") and r["fifo"].startswith("ok"), r
    assert outcome.failure is None, outcome
    assert not (request.output_dir / "fold_0" / "error.txt").is_symlink()
    assert not (request.output_dir / "bagged_scores.csv.x").exists()
    assert (tmp_path / "host-secret").read_text() == "hunter2"


def _output(folder: Path, acc: float, scores_csv: bool = True) -> None:
    for i in range(2):
        d = folder / f"fold_{i}"
        d.mkdir(parents=True)
        for step in ("train", "valid", "test"):
            (d / f"{step}_time").write_text("0.5")
        if scores_csv:
            (d / "scores.csv").write_text(f"step,acc\ntrain,{acc}\nvalid,{acc}\ntest,{acc}\n")
    (folder / "bagged_scores.csv").write_text(
        f"step,n_bag,acc\nvalid,0,{acc}\nvalid,1,{acc}\ntest,0,{acc}\ntest,1,{acc}\n"
    )


def _trusted(path: Path, acc: float) -> Path:
    fold = {step: {"acc": acc} for step in ("train", "valid", "test")}
    path.write_text(json.dumps(
        {"folds": [fold, fold], "bagged": {"valid": {"acc": [acc, acc]}, "test": {"acc": [acc, acc]}}}
    ))
    return path


def test_read_results_prefers_the_recomputed_scores(tmp_path: Path) -> None:
    _output(tmp_path / "same", 0.5)
    results, note = read_results(tmp_path / "same", 2, ["acc"], _trusted(tmp_path / "a.json", 0.5))
    assert note == "" and results == parse_training_output(tmp_path / "same", 2, ["acc"])

    _output(tmp_path / "forged", 1.0)
    results, note = read_results(tmp_path / "forged", 2, ["acc"], _trusted(tmp_path / "b.json", 0.25))
    assert results.bagged.last["acc"] == {"valid": 0.25, "test": 0.25}
    assert all(f.scores["acc"]["test"] == 0.25 and f.train_time == 0.5 for f in results.folds)
    assert note.startswith("scores recomputed outside the sandbox differ")
    assert "bagged valid acc: reported 1, recomputed 0.25" in note and "more" in note

    # the run deleted its score files: the recomputed scores still count
    _output(tmp_path / "deleted", 1.0, scores_csv=False)
    results, note = read_results(tmp_path / "deleted", 2, ["acc"], _trusted(tmp_path / "c.json", 0.25))
    assert results.folds[1].scores["acc"]["valid"] == 0.25
    assert "the run's own score files are unusable (fold_0/scores.csv: is missing)" in note

    # without recomputed scores the run's files are what there is
    results, note = read_results(tmp_path / "forged", 2, ["acc"], None)
    assert note == "" and results.bagged.last["acc"]["test"] == 1.0


def test_rescoring_uses_the_events_folds(empty_db_url: str, tmp_path: Path) -> None:
    """The event's folds (its cv_folds rows) are the truth, not the kit's get_cv
    of today: here the rows were changed after deployment (each fold's train
    and valid rows swapped), so the run's predictions were scored by ramp-test
    on other folds than the event's. The daemon stores the scores on the
    event's folds, computed outside the sandbox, and says they differ."""
    from rampwf.utils.testing import assert_read_problem
    from sqlalchemy import select, update

    from deployment import GOOD, Deployment
    from ramp_dispatcher.database.dispatcher_schema import runs
    from ramp_dispatcher.database.ramp_schema import (
        cv_folds, event_score_types, submission_on_cv_folds, submission_score_on_cv_folds,
        submission_scores, submissions,
    )  # fmt: skip

    require_bwrap()
    dep = Deployment(tmp_path / "deploy", empty_db_url, {"rf": GOOD})
    with dep.engine.begin() as conn:
        sid = conn.execute(select(submissions.c.id).where(submissions.c.name == "rf")).scalar_one()
        rows = conn.execute(select(cv_folds.c.id, cv_folds.c.train_is, cv_folds.c.test_is)
                            .order_by(cv_folds.c.id)).all()  # fmt: skip
        for row in rows:
            conn.execute(update(cv_folds).where(cv_folds.c.id == row.id)
                         .values(train_is=row.test_is, test_is=row.train_is))  # fmt: skip
    dep.run_until_done(timeout=240)
    summary = dep.summaries()["rf"]
    assert summary.state == "scored", summary

    # What the event's folds say, computed here from the saved predictions.
    ramp = dep.event_config().ramp
    problem = assert_read_problem(str(ramp.kit_dir))
    _, y_train = problem.get_train_data(path=str(ramp.data_dir))
    acc = next(st for st in problem.score_types if st.name == "acc")
    expected = []
    for i, row in enumerate(rows):
        valid_is = row.train_is  # the event's valid rows now
        with np.load(ramp.predictions_dir / f"submission_{sid:09d}" / f"fold_{i}" / "y_pred_train.npz") as f:
            y_pred = f["y_pred"]
        expected.append(acc.score_function(problem.Predictions(y_true=y_train, fold_is=valid_is),
                                           problem.Predictions(y_pred=y_pred, fold_is=valid_is)))  # fmt: skip
    folds, scores, sscf, est = submission_on_cv_folds, submission_scores, submission_score_on_cv_folds, event_score_types
    with dep.engine.connect() as conn:
        stored = conn.execute(
            select(sscf.c.valid_score)
            .join(folds, folds.c.id == sscf.c.submission_on_cv_fold_id)
            .join(scores, scores.c.id == sscf.c.submission_score_id)
            .join(est, est.c.id == scores.c.event_score_type_id)
            .where(folds.c.submission_id == sid, est.c.name == "acc")
            .order_by(folds.c.id)
        ).scalars().all()
        message = conn.execute(select(runs.c.message).where(runs.c.submission_id == sid)).scalar_one()
    assert stored == pytest.approx(expected)
    assert message.startswith("scores recomputed outside the sandbox differ"), message
    assert "valid nll" in message  # the training rows' likelihood is not the valid rows'


def test_event_folds_that_do_not_fit_the_data_are_the_platforms(tmp_path: Path) -> None:
    """A fold naming rows the data lacks (the data changed after the event was
    deployed) is not the submission's error: rescore.py exits 1, not 3."""
    from ramp_dispatcher.workers import rescore
    from ramp_dispatcher.workers.post_run import write_folds

    path = tmp_path / "folds.npz"
    write_folds(path, [(np.arange(0, 80), np.arange(80, 100)), (np.arange(20, 100), np.arange(0, 20))])
    cv = rescore.load_folds(str(path), 100)
    assert [len(t) for t, _ in cv] == [80, 80] and cv[1][1].tolist() == list(range(20))
    with pytest.raises(ValueError, match="the event's fold 0 \\(valid\\) names row 99, the training data has 90 rows"):
        rescore.load_folds(str(path), 90)


def test_the_daemons_folds_are_decoded_again_only_when_they_change(empty_db_url: str, tmp_path: Path) -> None:
    """The daemon reads the event's folds for every run's re-scoring, but
    decodes them (and makes their npz) again only when what is stored changed:
    a change of a ``cv_folds`` row is seen by the next run."""
    from sqlalchemy import select, update

    from deployment import GOOD, Deployment
    from ramp_dispatcher.database import queries
    from ramp_dispatcher.database.ramp_schema import cv_folds, submissions
    from ramp_dispatcher.workers.post_run import FoldsNpz, folds_npz

    def as_lists(folds):
        return [(list(train), list(test)) for train, test in folds]

    dep = Deployment(tmp_path / "deploy", empty_db_url, {"rf": GOOD})
    cache, npz = queries.FoldsCache(), FoldsNpz()
    with dep.engine.connect() as conn:
        sid = conn.execute(select(submissions.c.id).where(submissions.c.name == "rf")).scalar_one()
        first = cache.folds(conn, sid)
        assert as_lists(first) == as_lists(queries.submission_folds(conn, sid))
        assert len(first) >= 2
        assert cache.folds(conn, sid) is first  # unchanged: not decoded again
        packed = npz(first)
        assert packed == folds_npz(first) and npz(cache.folds(conn, sid)) is packed
    with dep.engine.begin() as conn:  # the first fold's rows swapped
        row = conn.execute(select(cv_folds).order_by(cv_folds.c.id).limit(1)).one()
        conn.execute(update(cv_folds).where(cv_folds.c.id == row.id)
                     .values(train_is=row.test_is, test_is=row.train_is))  # fmt: skip
    with dep.engine.connect() as conn:
        second = cache.folds(conn, sid)
        assert second is not first
        assert as_lists(second) == as_lists(queries.submission_folds(conn, sid))
        assert as_lists(second)[0] == as_lists(first)[0][::-1] and as_lists(second)[1:] == as_lists(first)[1:]
        assert npz(second) == folds_npz(second) != packed


# ---------------------------------------------------------------- the warm scorer
def _score_args(request: RunRequest, target: Path) -> list[str]:
    return ["--kit-dir", str(request.kit_dir), "--data-dir", str(request.data_dir),
            "--output-dir", str(request.output_dir), "--json", str(target)]  # fmt: skip


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def test_warm_scorer_scores_as_the_script_does(iris_kit: Path, tmp_path: Path) -> None:
    """One server per interpreter, kept between runs, scoring exactly as the
    one-shot script; restarted when the environment's packages change."""
    import subprocess

    from ramp_dispatcher.workers.post_run import RESCORE_SCRIPT, Scorer

    worker = CondaWorker(CondaConfig(conda_env=str(VENV), timeout=120, sandbox="none"))
    request = request_for(tmp_path, iris_kit, kit.GOOD)
    outcome, _ = run(worker, request)
    assert outcome.failure is None and outcome.trusted_scores is not None, outcome
    worker.close()
    once = tmp_path / "once.json"
    subprocess.run([sys.executable, "-I", "-B", str(RESCORE_SCRIPT), *_score_args(request, once)], check=True)

    scorer = Scorer(Path(sys.executable))
    try:
        assert scorer.score(_score_args(request, tmp_path / "warm1.json"), 120) == (0, "")
        server = scorer.pid
        assert scorer.score(_score_args(request, tmp_path / "warm2.json"), 120) == (0, "")
        assert scorer.pid == server  # the same warm process
        for name in ("warm1.json", "warm2.json"):
            assert json.loads((tmp_path / name).read_text()) == json.loads(once.read_text())

        # a kit that prints (to the server's answer pipe, were it not redirected)
        chatty = tmp_path / "chatty-kit"
        shutil.copytree(iris_kit, chatty)
        problem = chatty / "problem.py"
        problem.write_text("print('loading the problem', flush=True)\n" + problem.read_text())
        args = _score_args(request, tmp_path / "chatty.json")
        args[1] = str(chatty)
        assert scorer.score(args, 120) == (0, "") and scorer.pid == server
        assert json.loads((tmp_path / "chatty.json").read_text()) == json.loads(once.read_text())

        # what it watches is the environment's site-packages; a change there restarts it
        site_packages = next(p for p in scorer._watch if p.endswith("site-packages"))
        assert Path(site_packages).resolve().is_relative_to(VENV.resolve())
        scorer._watch[site_packages] -= 1.0  # as if a package was installed since
        assert scorer.score(_score_args(request, tmp_path / "warm3.json"), 120) == (0, "")
        assert scorer.pid != server and _group_gone(server)
    finally:
        scorer.close()
    assert scorer.pid is None


def test_warm_scorer_time_limit_and_missing_interpreter(iris_kit: Path, tmp_path: Path) -> None:
    """A scoring past its limit is killed with its server; the next one starts
    a new server. No interpreter: a clear failure, never a hang."""
    from ramp_dispatcher.workers.post_run import Scorer

    hung = tmp_path / "hung-kit"
    hung.mkdir()
    (hung / "problem.py").write_text("import time\ntime.sleep(600)\n")
    out = tmp_path / "out" / "fold_0"
    out.mkdir(parents=True)
    scorer = Scorer(Path(sys.executable))
    try:
        args = ["--kit-dir", str(hung), "--data-dir", str(hung), "--output-dir", str(out.parent),
                "--json", str(tmp_path / "s.json")]  # fmt: skip
        code, why = scorer.score(args, 3.0)
        assert (code, why) == (-1, "did not finish within 3 s")
        assert scorer.pid is None
        bad_kit = tmp_path / "bad-kit"
        bad_kit.mkdir()
        (bad_kit / "problem.py").write_text("raise RuntimeError('the kit is broken')\n")
        code, why = scorer.score(["--kit-dir", str(bad_kit), *args[2:]], 120)
        assert code == 1 and "RuntimeError: the kit is broken" in why
        assert scorer.pid is not None  # a failed scoring ends its child, not the server
    finally:
        scorer.close()
    missing = Scorer(tmp_path / "no-env" / "bin" / "python")
    code, why = missing.score(args, 10)
    assert code == -1 and "No such file" in why and str(tmp_path / "no-env") in why


def test_warm_scorer_ends_with_its_daemon(iris_kit: Path, tmp_path: Path) -> None:
    """A daemon killed with -9 leaves no scoring server behind: the server
    reads its requests on a pipe from the daemon and leaves when it closes."""
    import signal
    import subprocess

    hung = tmp_path / "slow-kit"
    hung.mkdir()
    (hung / "problem.py").write_text("import time\ntime.sleep(600)\n")
    (tmp_path / "out" / "fold_0").mkdir(parents=True)
    owner = subprocess.Popen(
        [sys.executable, "-c", (
            "import sys, threading\n"
            "from pathlib import Path\n"
            "from ramp_dispatcher.workers.post_run import Scorer\n"
            "s = Scorer(Path(sys.executable))\n"
            f"args = ['--kit-dir', {str(hung)!r}, '--data-dir', {str(hung)!r}, "
            f"'--output-dir', {str(tmp_path / 'out')!r}, '--json', {str(tmp_path / 's.json')!r}]\n"
            "threading.Thread(target=s.score, args=(args, 600), daemon=True).start()\n"
            "import time\n"
            "while s.pid is None: time.sleep(0.05)\n"
            "print(s.pid, flush=True)\n"
            "time.sleep(600)\n"
        )],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert owner.stdout is not None
        server = int(owner.stdout.readline())
        # the server is busy: a child of it is in the kit's 600 s import
        deadline = time.monotonic() + 60
        while not Path(f"/proc/{server}/task/{server}/children").read_text().strip():
            assert time.monotonic() < deadline, "the server never forked its child"
            time.sleep(0.1)
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    finally:
        owner.kill()
    # the child would sleep for ten minutes: the server's input closing ends both
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not _group_gone(server):
        time.sleep(0.2)
    assert _group_gone(server), "the scoring server outlived its daemon"
