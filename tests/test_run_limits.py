"""What one run may take: its log is bounded on disk and in the daemon's memory,
and its memory limit counts the tree's unique memory (PSS), not shared pages
once per process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ramp_dispatcher.database import admin
from ramp_dispatcher.demo import EVENT, TEAM, write_submission
from ramp_dispatcher.workers import supervise

from deployment import Deployment
from faults import DISPATCHER_EXE

MiB = 1024 * 1024

#: prints ``n_chunks`` x 8 MiB in big writes, then a traceback to stderr, then
#: dies at once (os._exit: ramp-test writes no error.txt, so the daemon has
#: only the log to find the traceback in)
NOISY_THEN_DEAD = """\
import os
import sys
import traceback

from sklearn.linear_model import LogisticRegression


class Noisy(LogisticRegression):
    def fit(self, X, y):
        chunk = ("noise " * 1365 + "\\n") * 1024
        for _ in range({n_chunks}):
            sys.stdout.write(chunk)
        sys.stdout.flush()
        try:
            raise ValueError("{message}")
        except ValueError:
            traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)


def get_estimator():
    return Noisy()
"""


def _daemon_peak_rss_mb(dep: Deployment, log: Path) -> float:
    """Run ``ramp-dispatcher run`` until hunger_policy exit; its peak RSS (MB)."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [str(DISPATCHER_EXE), "run", "--config", str(dep.server_path),
             "--event-config", str(dep.event_path)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        # wait4: the kernel's own high-water mark of the daemon, after it exited
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, log.read_text()[-3000:]
    return usage.ru_maxrss / 1024


def test_a_500_mb_log_stays_bounded_on_disk_and_in_the_daemon(empty_db_url: str, tmp_path: Path) -> None:
    small = NOISY_THEN_DEAD.format(n_chunks=0, message="died quietly")
    dep = Deployment(tmp_path / "deploy", empty_db_url, {"quiet": small}, n_workers=1)
    text = dep.event_path.read_text()
    dep.event_path.write_text(text.replace("  timeout:", "  max_log_mb: 2\n  timeout:", 1))

    # The same failure with a tiny log first: the daemon's own peak, imports and all.
    baseline_mb = _daemon_peak_rss_mb(dep, tmp_path / "daemon-1.log")
    assert dep.summaries()["quiet"].state == "training_error"

    message = "printed 500 MB then died"
    loud = NOISY_THEN_DEAD.format(n_chunks=60, message=message)  # 480 MiB
    with dep.engine.begin() as conn:
        sid = admin.add_submission(conn, EVENT, TEAM, "loud", write_submission(tmp_path / "loud", loud))
    peak_mb = _daemon_peak_rss_mb(dep, tmp_path / "daemon-2.log")

    s = dep.summaries()["loud"]
    assert s.state == "training_error", s.error_msg
    first_line = s.error_msg.splitlines()[0]
    assert first_line == f"Your submission failed: ValueError: {message} (ramp-test exited with code 1)"
    assert "Traceback (most recent call last):" in s.error_msg
    assert 'raise ValueError("printed 500 MB then died")' in s.error_msg
    assert "noise" not in s.error_msg
    # the daemon never held the log: it read a bounded tail of it
    assert peak_mb - baseline_mb < 20, (baseline_mb, peak_mb)

    log = dep.event_config().ramp.logs_dir / f"submission_{sid:09d}" / "log"
    size = log.stat().st_size
    assert size <= 2 * MiB, size
    with log.open("rb") as f:
        head = f.read(1000)
        f.seek(-2000, os.SEEK_END)
        tail = f.read()
    assert b"noise noise" in head
    assert tail.rstrip().endswith(f"ValueError: {message}".encode()), tail
    content = log.read_bytes()
    assert content.count(b"of output dropped here") == 1
    marker = next(ln for ln in content.splitlines() if b"of output dropped here" in ln)
    assert marker.startswith(b"[ramp-dispatcher] 4") and b"MiB of output dropped" in marker, marker
    assert b"(max_log_mb: 2)" in marker


def test_log_below_the_bound_is_kept_whole(tmp_path: Path) -> None:
    """Output under the bound, in pieces: the log is exactly what was printed."""
    script = tmp_path / "print.py"
    script.write_text("import sys\nfor i in range(20000):\n    print('line', i)\nsys.exit(3)\n")
    log, status = tmp_path / "log", tmp_path / "status.json"
    code = supervise.main([
        "--log", str(log), "--status", str(status), "--timeout", "60", "--max-log-mb", "1",
        "--nice", "0", "--", sys.executable, "-u", str(script),
    ])  # fmt: skip
    assert code == 0
    assert log.read_text() == "".join(f"line {i}\n" for i in range(20000))
    assert json.loads(status.read_text())["exit_code"] == 3


# --------------------------------------------------------------------------- memory

#: allocates ``mb`` MB (every page written), forks 2 children that only read
#: it, and waits for them; exits 0 when all went well
SHARED_ARRAY = """\
import os, sys, time
mb = int(sys.argv[1])
data = b"\\x01" * (mb * 1024 * 1024)
pids = []
for _ in range(2):
    pid = os.fork()
    if pid == 0:
        deadline = time.monotonic() + 4
        total = 0
        while time.monotonic() < deadline:
            total += data[::4096].count(1)  # reads every page; writes none
            time.sleep(0.2)
        os._exit(0 if total else 1)
    pids.append(pid)
codes = [os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids]
sys.exit(max(codes))
"""


def _supervise_shared(tmp_path: Path, mb: int, limit_mb: int) -> dict:
    script = tmp_path / "shared.py"
    script.write_text(SHARED_ARRAY)
    status = tmp_path / f"status-{limit_mb}.json"
    proc = subprocess.run(
        [sys.executable, "-I", "-S", str(Path(supervise.__file__).resolve()),
         "--log", str(tmp_path / f"log-{limit_mb}"), "--status", str(status),
         "--timeout", "120", "--memory-limit-mb", str(limit_mb), "--nice", "0",
         "--", sys.executable, "-I", "-S", str(script), str(mb)],
        capture_output=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(status.read_text())


@pytest.mark.skipif(supervise.pss_kib(os.getpid()) is None, reason="no /proc/<pid>/smaps_rollup here")
def test_memory_limit_counts_shared_pages_once(tmp_path: Path) -> None:
    """300 MB shared by a parent and 2 forked readers: about 900 MB of summed
    RSS, about 300 MB of PSS. A 600 MB limit lets it finish; 200 MB stops it."""
    status = _supervise_shared(tmp_path, 300, 600)
    assert (status["reason"], status["exit_code"]) == ("exited", 0), status
    assert status["max_ram_mb"] >= 300, status  # the array was really there

    status = _supervise_shared(tmp_path, 300, 200)
    assert status["reason"] == "memory", status
    assert "memory limit of 200 MB" in status["message"]


def test_pss_of_a_forked_reader_is_a_share(tmp_path: Path) -> None:
    """The measure itself: a child reading its parent's 200 MB has an RSS of
    about 200 MB but a PSS of about half of it; both sum to about 200 MB."""
    script = tmp_path / "share.py"
    script.write_text(textwrap.dedent("""\
        import os, sys, time
        data = b"\\x01" * (200 * 1024 * 1024)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            data[::4096].count(1)
            os.write(w, b"x")
            time.sleep(30)
            os._exit(0)
        os.read(r, 1)
        print(pid, flush=True)
        time.sleep(30)
        """))
    # its own session: one killpg stops parent and child
    proc = subprocess.Popen(
        [sys.executable, "-I", "-S", str(script)], stdout=subprocess.PIPE, start_new_session=True
    )
    try:
        assert proc.stdout is not None
        pids = [proc.pid, int(proc.stdout.readline())]
        rss = sum(supervise.rss_kib(p) for p in pids) / 1024
        tree = supervise.tree_memory_kib(pids) / 1024
        assert rss > 390, rss
        assert 190 < tree < 260, (tree, rss)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_a_spare_supervisor_runs_the_job_it_is_handed(tmp_path: Path) -> None:
    """``supervise.py --spare`` (the Dask worker's, started ahead) idles until
    its arguments come on stdin, then runs as if started with them, its own
    output in the run's log; a spare whose input ends first runs nothing."""
    script = str(Path(supervise.__file__).resolve())
    spare = subprocess.Popen([sys.executable, "-I", "-S", script, "--spare"], stdin=subprocess.PIPE,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    log, status = tmp_path / "log", tmp_path / "status.json"
    args = ["--log", str(log), "--status", str(status), "--timeout", "60", "--nice", "0",
            "--setenv", "RD_SPARE=handed", "--",
            sys.executable, "-I", "-S", "-c", "import os; print(os.environ['RD_SPARE']); raise SystemExit(3)"]  # fmt: skip
    job = {"argv": args, "output": str(log)}
    try:
        assert spare.stdin is not None
        spare.stdin.write(json.dumps(job).encode() + b"\n")
        spare.stdin.close()
        assert spare.wait(60) == 0
    finally:
        spare.kill()
    final = json.loads(status.read_text())
    assert (final["reason"], final["exit_code"]) == ("exited", 3)
    assert "handed" in log.read_text()

    unused = subprocess.Popen([sys.executable, "-I", "-S", script, "--spare"], stdin=subprocess.PIPE)
    assert unused.stdin is not None
    unused.stdin.close()
    assert unused.wait(30) == 0
    garbled = subprocess.run([sys.executable, "-I", "-S", script, "--spare"], input=b"{not json\n",
                             capture_output=True, timeout=30)  # fmt: skip
    assert garbled.returncode == 2 and b"bad spare job" in garbled.stderr
