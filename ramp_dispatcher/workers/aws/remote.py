"""The run protocol on the instance: the commands one run's thread sends over SSH.

The protocol is four constant shell scripts. Every value (paths, names,
numbers) reaches them only as a positional argument, and every command line is
built with :func:`shlex.join`, so no value is ever parsed as shell code. On the
instance, for one run::

    <kit>/.ramp-dispatcher/<submission>-attempt-<n>-<run>/   the run folder
        pid       the detached run's pid: also its session and process group
        started   epoch seconds (instance clock) when it started
        log       ramp-test's output
        maxrss    peak resident memory of ramp-test in KiB (memory_profiling)
        exit      ramp-test's exit code, written last and atomically
    <kit>/submissions/<submission>/    the uploaded files; training_output/ lands here

Creating the run folder is the lock that makes starting idempotent: a second
start (a restarted daemon, a retried command) finds it and starts nothing.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

from .ssh import SshError


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


# Started by the exec channel's shell; returns at once. $1 is the detached
# script, $2 the memory probe; the rest are values, always double-quoted.
_START = r"""
runner=$1 peak=$2 run=$3 kit=$4 data=$5 subs=$6 sub=$7 prefix=$8 mem=$9 threads=${10}
mkdir -p -- "${run%/*}" || exit 3
if ! mkdir -- "$run" 2>/dev/null; then echo ramp-dispatcher:already-started; exit 0; fi
rm -rf -- "$subs/$sub/training_output"
cd -- "$kit" || exit 4
setsid nohup bash -l -c "$runner" ramp-dispatcher-run \
    "$peak" "$run" "$kit" "$data" "$subs" "$sub" "$prefix" "$mem" "$threads" \
    </dev/null >"$run/log" 2>&1 &
echo ramp-dispatcher:started
"""

# The detached run, in a login shell so the image's profile sets up its
# environment (the AMI recipe activates conda in ~/.profile). setsid made
# this shell a session leader: $$ is the process group that a kill stops.
_RUN = r"""
peak=$1 run=$2 kit=$3 data=$4 subs=$5 sub=$6 prefix=$7 mem=$8 threads=$9
echo $$ > "$run/pid.tmp" && mv -f -- "$run/pid.tmp" "$run/pid"
date +%s > "$run/started"
if [ -n "$prefix" ]; then PATH="$prefix/bin:$PATH"; export PATH; fi
if [ -n "$threads" ]; then
    export OMP_NUM_THREADS="$threads" MKL_NUM_THREADS="$threads" OPENBLAS_NUM_THREADS="$threads"
fi
export PYTHONUNBUFFERED=1
cd -- "$kit" || { echo 126 > "$run/exit"; exit 126; }
set -- ramp-test --submission "$sub" --ramp-kit-dir "$kit" --ramp-data-dir "$data" \
    --ramp-submission-dir "$subs" --save-output --ignore-warning
if [ "$mem" = 1 ]; then set -- python3 -c "$peak" "$run/maxrss" "$@"; fi
"$@"
code=$?
echo "$code" > "$run/exit.tmp" && mv -f -- "$run/exit.tmp" "$run/exit"
"""

# Peak memory without tools the image may lack (GNU time, memory_profiler):
# the environment's own Python waits for ramp-test and reads its rusage.
_PEAK = r"""
import os, resource, subprocess, sys
try:
    code = subprocess.call(sys.argv[2:])
except OSError as exc:
    sys.stderr.write("cannot run %s: %s\n" % (sys.argv[2], exc))
    sys.exit(127)
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write("%d\n" % peak)
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
sys.exit(code if code >= 0 else 128 - code)
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
spot=
if [ -n "$imds" ]; then
    token=$(curl -s -f -m 2 -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' \
        "$imds/latest/api/token" 2>/dev/null)
    spot=$(curl -s -m 2 -o /dev/null -w '%{http_code}' -H "X-aws-ec2-metadata-token: $token" \
        "$imds/latest/meta-data/spot/instance-action" 2>/dev/null)
fi
started=$(num "$run/started") maxrss=$(num "$run/maxrss")
echo "ramp-dispatcher-status folder=$folder pid=$pid alive=$alive exit=$code" \
    "started=$started now=$(date +%s) maxrss=$maxrss spot=$spot"
"""

# Stop the run's whole process group: TERM, then KILL after the grace.
_KILL = r"""
run=$1 grace=$2
pid=; if [ -f "$run/pid" ]; then pid=$(tr -dc '0-9' < "$run/pid"); fi
if [ -z "$pid" ]; then echo ramp-dispatcher:no-run; exit 0; fi
kill -TERM -- "-$pid" 2>/dev/null
i=0
while kill -0 -- "-$pid" 2>/dev/null && [ "$i" -lt $((grace * 5)) ]; do
    sleep 0.2; i=$((i + 1))
done
kill -KILL -- "-$pid" 2>/dev/null
echo ramp-dispatcher:stopped
"""


def start_command(
    run: RemoteRun, env_prefix: str | None, memory_profiling: bool, n_threads: int | None
) -> list[str]:
    return [
        "bash", "-c", _START, "ramp-dispatcher-start", _RUN, _PEAK,
        run.run_dir, run.kit_dir, run.data_dir, run.submissions_dir, run.submission_name,
        env_prefix or "", "1" if memory_profiling else "0",
        "" if n_threads is None else str(int(n_threads)),
    ]  # fmt: skip


def status_command(run: RemoteRun, metadata_url: str | None) -> list[str]:
    return ["bash", "-c", _STATUS, "ramp-dispatcher-status", run.run_dir, metadata_url or ""]


def kill_command(run: RemoteRun, grace_s: int = 5) -> list[str]:
    return ["bash", "-c", _KILL, "ramp-dispatcher-kill", run.run_dir, str(int(grace_s))]


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
    )
