"""The aws worker's side of an instance: one SSH connection and the run protocol.

:class:`SshConnection` is one paramiko transport whose host key is checked
against a set of trusted SHA256 fingerprints *before* we authenticate (there
is no known_hosts to add to and nothing is ever accepted on first sight). It
runs commands with a deadline and copies folders over SFTP.

The run protocol is four constant shell scripts. Every value (paths, names,
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

import base64
import hashlib
import os
import posixpath
import shlex
import socket
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import paramiko

#: most bytes of a command's stdout/stderr we keep (status lines are tiny)
MAX_OUTPUT = 64 * 1024
#: entries we never upload: leftovers of a local run, not the participant's files
UPLOAD_SKIP = frozenset({"training_output", "__pycache__"})


class SshError(Exception):
    """The instance could not be reached, or a command or transfer failed."""


class HostKeyMismatch(SshError):
    """The server presented a host key the instance did not publish."""


# ----------------------------------------------------------------------- keys
def fingerprint(key_blob: bytes) -> str:
    """OpenSSH's SHA256 fingerprint of a public key blob (``ssh-keygen -l``)."""
    digest = base64.b64encode(hashlib.sha256(key_blob).digest()).decode()
    return "SHA256:" + digest.rstrip("=")


def fingerprint_of_public_key(b64_blob: str) -> str | None:
    """Fingerprint of the base64 field of a public key line; None if malformed."""
    try:
        return fingerprint(base64.b64decode(b64_blob, validate=True))
    except (ValueError, TypeError):
        return None


def known_hosts_fingerprints(path: Path) -> frozenset[str]:
    """Fingerprints of every key in an OpenSSH known_hosts-style file.

    Host names are ignored on purpose: instances get new addresses at each
    launch, so the file lists the keys baked into the image, whatever host.
    """
    found = set()
    for line in Path(path).read_text().splitlines():
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if fields[0].startswith("@"):  # @cert-authority / @revoked markers
            continue
        # "host keytype base64 [comment]" or "keytype base64 [comment]"
        for i, field in enumerate(fields[:-1]):
            if field.startswith(("ssh-", "ecdsa-", "sk-")):
                fp = fingerprint_of_public_key(fields[i + 1])
                if fp:
                    found.add(fp)
                break
    return frozenset(found)


def load_private_key(path: Path) -> paramiko.PKey:
    """The client key (RSA, ECDSA or Ed25519; OpenSSH or PEM format).

    Raises ValueError saying what is wrong; an encrypted key is refused
    because a daemon has nobody to ask for the passphrase.
    """
    try:
        return paramiko.PKey.from_path(str(path))
    except paramiko.PasswordRequiredException:
        raise ValueError("the key is protected by a passphrase; use an unencrypted key") from None
    except (paramiko.SSHException, ValueError, TypeError) as exc:
        raise ValueError(f"not a private key paramiko can read ({exc})") from None
    except OSError as exc:
        raise ValueError(f"cannot read it: {exc.strerror or exc}") from None


# ----------------------------------------------------------------- connection
@dataclass(frozen=True)
class CommandResult:
    exit_code: int
    stdout: str
    stderr: str


class SshConnection:
    """One authenticated SSH transport to one instance."""

    def __init__(self, transport: paramiko.Transport, where: str, op_timeout: float):
        self.transport = transport
        self.where = where
        self.op_timeout = op_timeout
        self._sftp: paramiko.SFTPClient | None = None

    @classmethod
    def open(
        cls,
        host: str,
        port: int,
        user: str,
        key: paramiko.PKey,
        trusted: frozenset[str],
        connect_timeout: float,
        op_timeout: float,
    ) -> SshConnection:
        where = f"{host}:{port}"
        try:
            sock = socket.create_connection((host, port), timeout=connect_timeout)
        except OSError as exc:
            raise SshError(f"cannot connect to {where}: {exc.strerror or exc}") from None
        transport = paramiko.Transport(sock)
        transport.banner_timeout = connect_timeout
        transport.handshake_timeout = connect_timeout
        transport.auth_timeout = connect_timeout
        try:
            transport.start_client(timeout=connect_timeout)
            server_key = transport.get_remote_server_key()
            # Checked before authenticating: an impostor learns nothing.
            if server_key.fingerprint not in trusted:
                raise HostKeyMismatch(
                    f"{where} presented the {server_key.get_name()} host key "
                    f"{server_key.fingerprint}, which is not among the "
                    f"{len(trusted)} key(s) the instance published: refusing to connect"
                )
            transport.auth_publickey(user, key)
            if not transport.is_authenticated():
                raise SshError(f"{where}: public key authentication as {user!r} failed")
        except SshError:
            transport.close()
            raise
        except (paramiko.SSHException, OSError, EOFError) as exc:
            transport.close()
            raise SshError(f"SSH to {where} failed: {_describe(exc)}") from None
        transport.set_keepalive(15)  # notice a dead peer between checks
        return cls(transport, where, op_timeout)

    @property
    def alive(self) -> bool:
        return self.transport.is_active()

    def close(self) -> None:
        try:
            if self._sftp is not None:
                self._sftp.close()
        except Exception:
            pass
        self._sftp = None
        self.transport.close()

    # -- commands
    def run(self, argv: Sequence[str], timeout: float | None = None) -> CommandResult:
        """Run one command, every argument quoted; fail after ``timeout`` seconds."""
        limit = self.op_timeout if timeout is None else timeout
        command = shlex.join(argv)
        try:
            chan = self.transport.open_session(timeout=limit)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise SshError(f"{self.where}: cannot open a channel: {_describe(exc)}") from None
        out: list[bytes] = []
        err: list[bytes] = []
        sizes = [0, 0]
        try:
            chan.settimeout(limit)
            chan.exec_command(command)
            deadline = time.monotonic() + limit
            while True:
                while chan.recv_ready():
                    _keep(out, chan.recv(32768), sizes, 0)
                while chan.recv_stderr_ready():
                    _keep(err, chan.recv_stderr(32768), sizes, 1)
                if chan.exit_status_ready():
                    # The exit status comes after the data on the channel.
                    while chan.recv_ready():
                        _keep(out, chan.recv(32768), sizes, 0)
                    while chan.recv_stderr_ready():
                        _keep(err, chan.recv_stderr(32768), sizes, 1)
                    code = chan.recv_exit_status()
                    break
                if not self.transport.is_active():
                    raise SshError(f"{self.where}: connection lost during a command")
                if time.monotonic() > deadline:
                    raise SshError(f"{self.where}: a command took longer than {limit:g} s")
                chan.status_event.wait(0.02)
        except SshError:
            raise
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise SshError(f"{self.where}: command failed: {_describe(exc)}") from None
        finally:
            chan.close()
        return CommandResult(
            code, b"".join(out).decode("utf-8", "replace"), b"".join(err).decode("utf-8", "replace")
        )

    # -- files
    def sftp(self) -> paramiko.SFTPClient:
        if self._sftp is None:
            try:
                self._sftp = paramiko.SFTPClient.from_transport(self.transport)
            except (paramiko.SSHException, OSError, EOFError) as exc:
                raise SshError(f"{self.where}: cannot start SFTP: {_describe(exc)}") from None
            if self._sftp is None:
                raise SshError(f"{self.where}: cannot start SFTP")
            # A stalled transfer raises instead of hanging the run's thread.
            self._sftp.get_channel().settimeout(self.op_timeout)
        return self._sftp

    def upload_tree(self, local_dir: Path, remote_dir: str) -> int:
        """Copy the regular files under ``local_dir`` into ``remote_dir``; return the count."""
        sftp = self.sftp()
        count = 0
        try:
            self._makedirs(remote_dir)
            for root, dirs, files in os.walk(local_dir):
                rel = os.path.relpath(root, local_dir)
                dirs[:] = sorted(d for d in dirs if d not in UPLOAD_SKIP)
                target = remote_dir if rel == "." else posixpath.join(remote_dir, *Path(rel).parts)
                if rel != ".":
                    self._makedirs(target)
                for name in sorted(files):
                    path = os.path.join(root, name)
                    if not os.path.isfile(path) or os.path.islink(path):
                        continue  # no symlinks: they could point anywhere
                    sftp.put(path, posixpath.join(target, name))
                    count += 1
        except (OSError, paramiko.SSHException, EOFError) as exc:
            raise SshError(
                f"{self.where}: upload to {remote_dir} failed: {_describe(exc)}"
            ) from None
        return count

    def download_file(self, remote: str, local: Path) -> bool:
        """Copy one remote file; False when it does not exist."""
        sftp = self.sftp()
        try:
            sftp.stat(remote)
        except FileNotFoundError:
            return False
        except (OSError, paramiko.SSHException, EOFError) as exc:
            raise SshError(f"{self.where}: cannot stat {remote}: {_describe(exc)}") from None
        try:
            local.parent.mkdir(parents=True, exist_ok=True)
            sftp.get(remote, str(local))
        except (OSError, paramiko.SSHException, EOFError) as exc:
            raise SshError(f"{self.where}: download of {remote} failed: {_describe(exc)}") from None
        return True

    def download_tree(self, remote_dir: str, local_dir: Path) -> bool:
        """Copy a remote folder's regular files and folders; False when it does not exist."""
        sftp = self.sftp()
        try:
            top = sftp.stat(remote_dir)
        except FileNotFoundError:
            return False
        except (OSError, paramiko.SSHException, EOFError) as exc:
            raise SshError(f"{self.where}: cannot stat {remote_dir}: {_describe(exc)}") from None
        if not stat.S_ISDIR(top.st_mode or 0):
            raise SshError(f"{self.where}: {remote_dir} is not a folder")
        todo = [(remote_dir, local_dir)]
        try:
            while todo:
                remote, local = todo.pop()
                local.mkdir(parents=True, exist_ok=True)
                for entry in sftp.listdir_attr(remote):
                    mode = entry.st_mode or 0
                    src = posixpath.join(remote, entry.filename)
                    dest = local / entry.filename
                    if stat.S_ISDIR(mode):
                        todo.append((src, dest))
                    elif stat.S_ISREG(mode):  # symlinks and devices are skipped
                        sftp.get(src, str(dest))
        except (OSError, paramiko.SSHException, EOFError) as exc:
            raise SshError(
                f"{self.where}: download of {remote_dir} failed: {_describe(exc)}"
            ) from None
        return True

    def _makedirs(self, remote_dir: str) -> None:
        sftp = self.sftp()
        parts = [p for p in remote_dir.split("/") if p]
        path = "/" if remote_dir.startswith("/") else ""
        for part in parts:
            path = posixpath.join(path, part) if path else part
            try:
                attrs = sftp.stat(path)
            except FileNotFoundError:
                sftp.mkdir(path)
                continue
            if not stat.S_ISDIR(attrs.st_mode or 0):
                raise OSError(f"{path} exists and is not a folder")


def _keep(chunks: list[bytes], data: bytes, sizes: list[int], i: int) -> None:
    room = MAX_OUTPUT - sizes[i]
    if room > 0:
        chunks.append(data[:room])
        sizes[i] += min(len(data), room)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --------------------------------------------------------------- run protocol
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
