"""Sandbox: what bubblewrap and the trusted re-scoring add to each run.

- Start-up: the conda worker's real bwrap argv (the project's venv, a kit, a
  submission) around ``/bin/true`` and around ``python -I -S -c pass``, against
  the same commands without it; median of N, the difference is the cost per
  run. Target: under 20 ms.
- A whole run: the conda worker (supervisor, ramp-test on the iris kit) with
  ``sandbox: bwrap`` and ``sandbox: none``, post-run checks off, median wall.
- Trusted scoring: ``workers/rescore.py`` on a real output, on the event's
  folds as the daemon hands them over (``--folds``; here the kit's ``get_cv``
  folds, as deploying the event stores them), for the demo's iris kit (120
  training rows) and the same problem with 20 000 rows, median of 3; this is
  the cost of ``verify_scores`` per run (it runs off the
  daemon's loop, in a worker thread, and the run's slot stays taken meanwhile).
"""

from __future__ import annotations

import csv
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

from .common import Row, median, say, scratch_dir, settle

TARGET_MS = 20.0


def run(quick: bool, backends: list[str]) -> list[Row]:
    from ramp_dispatcher.workers import sandbox as sb

    try:
        bwrap = sb.check_bwrap(sb.find_bwrap())
    except sb.SandboxError as exc:
        return [Row("sandbox", "bwrap start-up", f"not measured: {exc}"[:100], met=False)]
    rows: list[Row] = []
    with scratch_dir("sandbox") as tmp:
        kit = tmp / "kit"
        _write_kit(kit, n_rows=150)
        rows += _startup(bwrap, tmp, kit, n=20 if quick else 60)
        rows += _whole_run(tmp, kit, n=1 if quick else 3)
        for n_rows in (150, 20_000):
            big = tmp / f"kit{n_rows}"
            _write_kit(big, n_rows)
            rows += _rescore(tmp, big, n_rows, n=1 if quick else 3)
    return rows


def _write_kit(kit: Path, n_rows: int) -> None:
    """The demo's iris problem; beyond 150 rows, iris rows jittered."""
    from ramp_dispatcher.demo import write_iris_kit, write_submission, SUBMISSIONS

    write_iris_kit(kit, kit)
    write_submission(kit / "submissions" / "starting_kit", SUBMISSIONS["random_forest"])
    if n_rows <= 150:
        return
    rng = random.Random(0)
    for name, share in (("train.csv", 0.8), ("test.csv", 0.2)):
        path = kit / "data" / name
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        head, body = rows[0], rows[1:]
        out = [
            [f"{float(v) + rng.gauss(0, 0.1):.3f}" for v in r[:4]] + [r[4]]
            for r in (rng.choice(body) for _ in range(int(n_rows * share)))
        ]
        with open(path, "w", newline="") as f:
            csv.writer(f).writerows([head, *out])


def _spec(kit: Path, tmp: Path):
    from ramp_dispatcher.workers import sandbox as sb

    sub = tmp / "submissions" / "submission_000000001"
    (sub / "training_output").mkdir(parents=True, exist_ok=True)
    return sb.SandboxSpec(
        python_roots=sb.python_roots(Path(sys.prefix)),
        kit_dir=kit, data_dir=kit, submission_dir=sub, output_dir=sub / "training_output",
        hidden=(tmp / "submissions",), system=sb.system_binds(),
    )  # fmt: skip


def _wall(argv: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, check=True)
    return (time.perf_counter() - t0) * 1000


def _startup(bwrap: str, tmp: Path, kit: Path, n: int) -> list[Row]:
    """Bare and sandboxed starts alternate, so a busy machine slows both alike;
    the figure is the median of the n paired differences. (CPU time is no
    measure here: processes reaped inside the sandbox's PID namespace are
    not all charged to the parent.)"""
    from ramp_dispatcher.workers import sandbox as sb

    spec = _spec(kit, tmp)
    env = sb.sandbox_env(spec, os.environ)
    rows = []
    for label, command in (
        ("true", ["/bin/true"]),
        ("python -I -S -c pass", [sys.executable, "-I", "-S", "-c", "pass"]),
    ):
        settle()
        boxed_argv = sb.bwrap_argv(spec, command)
        bare, boxed, diffs = [], [], []
        for _ in range(n):
            b = _wall(command, env)
            s = _wall(boxed_argv, env)
            bare.append(b)
            boxed.append(s)
            diffs.append(s - b)
        cost = median(diffs)
        say(f"  {label}: {median(bare):.1f} ms bare, {median(boxed):.1f} ms in the sandbox; "
            f"median paired difference +{cost:.1f} ms")  # fmt: skip
        rows.append(Row("sandbox", f"start-up per run ({label})", f"+{cost:.1f} ms",
                        f"< {TARGET_MS:g} ms", cost < TARGET_MS))  # fmt: skip
    return rows


def _whole_run(tmp: Path, kit: Path, n: int) -> list[Row]:
    from ramp_dispatcher.workers.base import RunRequest
    from ramp_dispatcher.workers.conda import CondaConfig, CondaWorker

    walls: dict[str, list[float]] = {"bwrap": [], "none": []}
    for _ in range(n):
        for mode in ("none", "bwrap"):  # alternating: a busy machine slows both alike
            name = f"submission_{100 + len(walls['bwrap']) + len(walls['none']):09d}"
            sub = tmp / "runs" / "submissions" / name
            sub.mkdir(parents=True)
            (sub / "estimator.py").write_text((kit / "submissions" / "starting_kit" / "estimator.py").read_text())
            request = RunRequest(1, name, 1, kit, kit, tmp / "runs" / "submissions",
                                 tmp / "runs" / "logs", tmp / "runs" / "predictions")  # fmt: skip
            worker = CondaWorker(CondaConfig(conda_env=sys.prefix, sandbox=mode, verify_scores=False))
            settle()
            t0 = time.perf_counter()
            handle = worker.start(request, lambda: None)
            while (outcome := worker.check(request, handle)) is None:
                time.sleep(0.02)
            walls[mode].append(time.perf_counter() - t0)
            worker.cleanup(request, handle)
            if outcome.failure is not None:
                raise RuntimeError(f"{mode} run failed: {outcome.message}")
    none, boxed = median(walls["none"]), median(walls["bwrap"])
    say(f"  whole run (iris, ramp-test): {none:.2f} s without, {boxed:.2f} s in the sandbox")
    return [Row("sandbox", "whole run wall, sandbox: none / bwrap", f"{none:.2f} s / {boxed:.2f} s")]


def _rescore(tmp: Path, kit: Path, n_rows: int, n: int) -> list[Row]:
    from rampwf.utils.testing import assert_read_problem

    from ramp_dispatcher.workers.post_run import RESCORE_SCRIPT, write_folds

    subs = tmp / f"rescore{n_rows}"
    name = "submission_000000001"
    (subs / name).mkdir(parents=True)
    (subs / name / "estimator.py").write_text((kit / "submissions" / "starting_kit" / "estimator.py").read_text())
    subprocess.run(
        [str(Path(sys.prefix) / "bin" / "ramp-test"), "--submission", name, "--ramp-kit-dir", str(kit),
         "--ramp-data-dir", str(kit), "--ramp-submission-dir", str(subs), "--save-output",
         "--ignore-warning"],
        check=True, capture_output=True,
    )  # fmt: skip
    problem = assert_read_problem(str(kit))
    X_train, y_train = problem.get_train_data(path=str(kit))
    write_folds(subs / "folds.npz", list(problem.get_cv(X_train, y_train)))
    times, cpus = [], []
    for _ in range(n):
        settle()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-I", "-B", str(RESCORE_SCRIPT), "--kit-dir", str(kit), "--data-dir", str(kit),
             "--output-dir", str(subs / name / "training_output"), "--json", str(subs / "scores.json"),
             "--folds", str(subs / "folds.npz")],
            check=True, capture_output=True,
        )  # fmt: skip
        times.append(time.perf_counter() - t0)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    t, cpu = median(times), median(cpus)
    say(f"  trusted scoring, {n_rows} rows, 3 folds, cold: {t:.2f} s wall, {cpu:.2f} s CPU per run")
    warm_t, warm_cpu = _warm_rescore(subs, kit, name, n)
    say(f"  trusted scoring, {n_rows} rows, 3 folds, warm: {warm_t:.2f} s wall, {warm_cpu:.2f} s CPU per run")
    return [
        Row("sandbox", f"trusted scoring per run ({n_rows} rows), cold: wall / CPU", f"{t:.2f} s / {cpu:.2f} s"),
        Row("sandbox", f"trusted scoring per run ({n_rows} rows), warm: wall / CPU",
            f"{warm_t:.2f} s / {warm_cpu:.2f} s"),
    ]  # fmt: skip


def _warm_rescore(subs: Path, kit: Path, name: str, n: int) -> tuple[float, float]:
    """Median wall and CPU of a request to a warm scorer (its first one not counted)."""
    from ramp_dispatcher.workers.post_run import Scorer

    def tree_cpu(pid: int) -> float:  # the server's own CPU and its reaped children's
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")

    args = ["--kit-dir", str(kit), "--data-dir", str(kit), "--output-dir",
            str(subs / name / "training_output"), "--json", str(subs / "scores.json"),
            "--folds", str(subs / "folds.npz")]  # fmt: skip
    scorer = Scorer(Path(sys.executable))
    times, cpus = [], []
    try:
        assert scorer.score(args, 600)[0] == 0  # start-up, not counted
        for _ in range(n):
            settle()
            assert scorer.pid is not None
            before = tree_cpu(scorer.pid)
            t0 = time.perf_counter()
            code, err = scorer.score(args, 600)
            times.append(time.perf_counter() - t0)
            cpus.append(tree_cpu(scorer.pid) - before)
            assert code == 0, err
    finally:
        scorer.close()
    return median(times), median(cpus)
