"""The run protocol on the instance: the commands one run's thread sends over SSH.

The protocol is a few constant shell scripts and five Python files shipped
by value (:class:`RemoteTools`: the supervisor ``supervise.py``, the sandbox's
``sandbox.py``, the instance side :mod:`.launch`, and for the re-scoring
``post_run.py`` and ``rescore.py``), with the event's folds (an npz). Every value (paths,
names, numbers, the run's JSON spec) reaches them only as a positional
argument, and every command line is built with :func:`shlex.join`, so no
value is ever parsed as shell code. On the instance, for one run::

    <kit>/.ramp-dispatcher/tools/<name>-<digest>.py     the shipped files
    <kit>/.ramp-dispatcher/tools/folds-<digest>.npz     the event's folds
    <kit>/.ramp-dispatcher/<submission>-attempt-<n>-<run>/   the run folder
        pid       the detached run's pid: also its session and process group
        started   epoch seconds (instance clock) when it started
        log       ramp-test's output, bounded by the supervisor (max_log_mb)
        status.json  the supervisor's status
        maxrss    peak memory of ramp-test's tree in KiB
        reason    the supervisor's reason (exited, timeout, killed, ...)
        checked.json  after a clean exit with verify_scores: the post-run
                  checks' result (post_run.check_output), scores in scores.json
        exit      ramp-test's exit code, written last and atomically
    <kit>/submissions/<submission>/    the uploaded files; training_output/ lands here

Before a start, the check command asks the launcher, in the login shell the
run will have, whether the image can run it (Python, ramp-test, bubblewrap).
Creating the run folder is the lock that makes starting idempotent: a second
start (a restarted daemon, a retried command) finds it and starts nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import post_run, rescore, sandbox, supervise
from . import launch
from .ssh import SshConnection, SshError

#: how long the kill command waits for the supervisor to stop ramp-test's
#: tree (its own TERM grace is 5 s, then it drains the output up to 2 s)
KILL_GRACE_S = 15


@dataclass(frozen=True)
class RemoteRun:
    """Where one run lives on the instance."""

    kit_dir: str
    data_dir: str
    submissions_dir: str
    submission_name: str
    run_dir: str

    @property
    def submission_dir(self) -> str:
        return posixpath.join(self.submissions_dir, self.submission_name)

    @property
    def output_dir(self) -> str:
        return posixpath.join(self.submission_dir, "training_output")

    @property
    def log(self) -> str:
        return posixpath.join(self.run_dir, "log")

    @property
    def tools_dir(self) -> str:
        return posixpath.join(posixpath.dirname(self.run_dir), "tools")


@dataclass(frozen=True)
class RemoteTools:
    """Where the shipped files are on the instance, and the Python that runs them."""

    python: str
    launcher: str
    supervisor: str
    sandbox_module: str
    post_run: str
    rescorer: str
    #: the event's folds (post_run.folds_npz), or None: rescored on the kit's get_cv
    folds: str | None = None


#: the files shipped to every instance, by the name they are known by
_SHIPPED = {
    "launcher": launch, "supervisor": supervise, "sandbox_module": sandbox,
    "post_run": post_run, "rescorer": rescore,
}  # fmt: skip


def install_tools(
    conn: SshConnection, run: RemoteRun, python: str, folds: bytes | None = None
) -> RemoteTools:
    """Upload the shipped files unless the instance has them (named by digest)."""
    paths: dict[str, str] = {}
    for field, module in _SHIPPED.items():
        source = Path(str(module.__file__))
        data = source.read_bytes()
        digest = hashlib.sha256(data).hexdigest()[:16]
        remote = posixpath.join(run.tools_dir, f"{source.stem}-{digest}.py")
        conn.install_file(data, remote)
        paths[field] = remote
    if folds is not None:
        digest = hashlib.sha256(folds).hexdigest()[:16]
        paths["folds"] = posixpath.join(run.tools_dir, f"folds-{digest}.npz")
        conn.install_file(folds, paths["folds"])
    return RemoteTools(python=python, **paths)


def run_spec(
    run: RemoteRun,
    tools: RemoteTools,
    *,
    env_prefix: str | None,
    sandboxed: bool,
    timeout: float,
    max_log_mb: float,
    n_threads: int | None,
    verify_scores: bool = False,
) -> dict[str, Any]:
    """What the launcher needs to know of one run (see :mod:`.launch`)."""
    rescoring = None
    if verify_scores:
        rescoring = {"post_run": tools.post_run, "script": tools.rescorer, "folds": tools.folds}
    return {
        "run_dir": run.run_dir,
        "kit_dir": run.kit_dir,
        "data_dir": run.data_dir,
        "submissions_dir": run.submissions_dir,
        "submission": run.submission_name,
        "env_prefix": env_prefix or "",
        "sandbox": "bwrap" if sandboxed else "none",
        "timeout": float(timeout),
        "max_log_mb": float(max_log_mb),
        "n_threads": n_threads,
        "supervisor": tools.supervisor,
        "sandbox_module": tools.sandbox_module,
        "limits": dataclasses.asdict(sandbox.DEFAULT_LIMITS),
        "rescore": rescoring,
    }


# Started by the exec channel's shell; returns at once. $1 is the detached
# script; the rest are values, always double-quoted.
_START = r"""
runner=$1 py=$2 launcher=$3 run=$4 kit=$5 subs=$6 sub=$7 spec=$8
mkdir -p -- "${run%/*}" || exit 3
if ! mkdir -- "$run" 2>/dev/null; then echo ramp-dispatcher:already-started; exit 0; fi
rm -rf -- "$subs/$sub/training_output"
cd -- "$kit" || exit 4
setsid nohup bash -l -c "$runner" ramp-dispatcher-run "$py" "$launcher" "$run" "$kit" "$spec" \
    </dev/null >"$run/log" 2>&1 &
echo ramp-dispatcher:started
"""

# The detached run, in a login shell so the image's profile sets up its
# environment (the AMI recipe activates conda in ~/.profile). setsid made
# this shell a session leader: $$ is the process group that a kill stops;
# exec keeps it for the launcher (launch.py), which writes "exit".
_RUN = r"""
py=$1 launcher=$2 run=$3 kit=$4 spec=$5
echo $$ > "$run/pid.tmp" && mv -f -- "$run/pid.tmp" "$run/pid"
date +%s > "$run/started"
cd -- "$kit" || { echo 126 > "$run/exit"; exit 126; }
command -v -- "$py" >/dev/null || { echo "no $py on the image" >&2; echo 127 > "$run/exit"; exit 127; }
exec "$py" -I -S "$launcher" run "$spec"
"""

# Whether the image can run the run (python, ramp-test, the sandbox), asked
# of the launcher in the same login shell the run will have.
_CHECK = r"""
exec "$1" -I -S "$2" check "$3"
"""

# One status line per check. "alive" is read before "exit": a run that
# ends in between shows as finished, never as died-without-exit-code.
_STATUS = r"""
run=$1 imds=$2
num() { if [ -f "$1" ]; then tr -dc '0-9' < "$1"; fi; }
folder=0; if [ -d "$run" ]; then folder=1; fi
pid=$(num "$run/pid")
alive=0; if [ -n "$pid" ] && kill -0 -- "-$pid" 2>/dev/null; then alive=1; fi
code=$(num "$run/exit")
reason=; if [ -f "$run/reason" ]; then reason=$(tr -dc 'a-z_' < "$run/reason"); fi
spot=
if [ -n "$imds" ]; then
    token=$(curl -s -f -m 2 -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' \
        "$imds/latest/api/token" 2>/dev/null)
    spot=$(curl -s -m 2 -o /dev/null -w '%{http_code}' -H "X-aws-ec2-metadata-token: $token" \
        "$imds/latest/meta-data/spot/instance-action" 2>/dev/null)
fi
started=$(num "$run/started") maxrss=$(num "$run/maxrss")
echo "ramp-dispatcher-status folder=$folder pid=$pid alive=$alive exit=$code" \
    "started=$started now=$(date +%s) maxrss=$maxrss spot=$spot reason=$reason"
"""

# Stop the run: TERM to its group, where the supervisor stops ramp-test's
# tree and the launcher writes "exit" (CONT: a stopped supervisor must see
# the TERM). What is left after the grace is killed, with ramp-test's own
# group (the supervisor started it in a group of its own).
_KILL = r"""
run=$1 grace=$2
pid=; if [ -f "$run/pid" ]; then pid=$(tr -dc '0-9' < "$run/pid"); fi
if [ -z "$pid" ]; then echo ramp-dispatcher:no-run; exit 0; fi
kill -TERM -- "-$pid" 2>/dev/null
kill -CONT -- "-$pid" 2>/dev/null
i=0
while kill -0 -- "-$pid" 2>/dev/null && [ "$i" -lt $((grace * 5)) ]; do
    sleep 0.2; i=$((i + 1))
done
if kill -0 -- "-$pid" 2>/dev/null; then
    kill -KILL -- "-$pid" 2>/dev/null
    child=$(sed -n 's/.*"child_pid": *\([0-9][0-9]*\).*/\1/p' "$run/status.json" 2>/dev/null)
    if [ -n "$child" ]; then kill -KILL -- "-$child" 2>/dev/null; fi
fi
echo ramp-dispatcher:stopped
"""


def start_command(run: RemoteRun, tools: RemoteTools, spec: dict[str, Any]) -> list[str]:
    return [
        "bash", "-c", _START, "ramp-dispatcher-start", _RUN, tools.python, tools.launcher,
        run.run_dir, run.kit_dir, run.submissions_dir, run.submission_name, json.dumps(spec),
    ]  # fmt: skip


def check_command(tools: RemoteTools, spec: dict[str, Any]) -> list[str]:
    return [
        "bash", "-l", "-c", _CHECK, "ramp-dispatcher-check",
        tools.python, tools.launcher, json.dumps(spec),
    ]  # fmt: skip


def status_command(run: RemoteRun, metadata_url: str | None) -> list[str]:
    return ["bash", "-c", _STATUS, "ramp-dispatcher-status", run.run_dir, metadata_url or ""]


def kill_command(run: RemoteRun, grace_s: int = KILL_GRACE_S) -> list[str]:
    return ["bash", "-c", _KILL, "ramp-dispatcher-kill", run.run_dir, str(int(grace_s))]


def parse_check(stdout: str) -> tuple[str, str] | None:
    """(setting, why) of what the image lacks, from the check command; None: it can run."""
    line = next(
        (ln for ln in stdout.splitlines() if ln.startswith("ramp-dispatcher-check ")), None
    )
    if line is None:
        raise SshError(f"unexpected check output: {stdout.strip()[-300:]!r}")
    result = json.loads(line.split(" ", 1)[1])
    return None if result.get("error") is None else (result["key"], result["error"])


@dataclass(frozen=True)
class RemoteStatus:
    """What one status command saw on the instance."""

    folder: bool  # the run folder exists (the run was started once)
    pid: int | None
    alive: bool  # some process of the run's group is still there
    exit_code: int | None
    started: int | None  # epoch seconds, instance clock
    now: int | None
    maxrss_kib: int | None
    spot: str  # HTTP status of spot/instance-action; "" when not asked
    #: the supervisor's final reason (exited, timeout, killed, spawn_error,
    #: supervisor_failed); "" while it runs, and for runs started without it
    reason: str = ""

    @property
    def elapsed(self) -> float | None:
        """Seconds since the run started, both ends read on the instance's clock."""
        if self.started is None or self.now is None:
            return None
        return float(self.now - self.started)

    @property
    def spot_interruption(self) -> bool:
        # 200: a stop/terminate is scheduled; 404: none (IMDSv2 semantics).
        return self.spot == "200"


def parse_status(stdout: str) -> RemoteStatus:
    line = next(
        (ln for ln in stdout.splitlines() if ln.startswith("ramp-dispatcher-status ")), None
    )
    if line is None:
        raise SshError(f"unexpected status output: {stdout.strip()[:200]!r}")
    fields = dict(item.partition("=")[::2] for item in line.split()[1:])

    def num(name: str) -> int | None:
        value = fields.get(name, "")
        return int(value) if value.isdigit() else None

    return RemoteStatus(
        folder=fields.get("folder") == "1",
        pid=num("pid"),
        alive=fields.get("alive") == "1",
        exit_code=num("exit"),
        started=num("started"),
        now=num("now"),
        maxrss_kib=num("maxrss"),
        spot=fields.get("spot", ""),
        reason=fields.get("reason", ""),
    )
