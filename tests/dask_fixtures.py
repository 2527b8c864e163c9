"""A real Dask cluster on 127.0.0.1 for the dask worker's tests.

One ``dask scheduler`` and ``dask worker --nthreads 1 --resources ramp=1``
processes, started by path from this environment on free ports. Each Dask
worker runs in its own mount namespace (``unshare -m``) with a tmpfs over
every hidden folder: the tests' temporary folders (where the deployments
live) and this project's package folder. So a Dask worker can see neither
the kit, the data, the submissions nor the logs, nor import ramp_dispatcher:
the runs prove the no-shared-filesystem path and the by-value shipping of the
task and the supervisor.

Every process carries :data:`faults.MARKER_VAR` with the cluster's marker in
its environment, inherited by the supervisors and ramp-test on the Dask
workers, so a test can find (and teardown can kill) whatever is left.
"""

from __future__ import annotations

import datetime as dt
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from faults import MARKER_VAR, kill_marked, marked_pids, ramp_test_pids, wait_for
from helpers import free_port

DASK_EXE = Path(sys.prefix) / "bin" / "dask"
PACKAGE_DIR = Path(__file__).resolve().parent.parent / "ramp_dispatcher"


def unavailable() -> str | None:
    """Why the cluster cannot run here, or None."""
    if not DASK_EXE.exists():
        return f"{DASK_EXE} not found (the 'dask' extra)"
    if shutil.which("unshare") is None:
        return "unshare (util-linux) not found"
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount -t tmpfs none /mnt"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        return f"cannot make a private mount namespace here: {probe.stderr.strip()}"
    return None


@dataclass
class TlsFiles:
    ca: Path
    cert: Path  # scheduler and workers
    key: Path
    client_cert: Path  # the daemon
    client_key: Path


def make_tls_files(folder: Path) -> TlsFiles:
    """A CA, a certificate for the cluster (127.0.0.1) and one for the daemon."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    import ipaddress

    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key, path: Path) -> None:
        path.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ))  # fmt: skip
        path.chmod(0o600)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder().subject_name(name("test CA")).issuer_name(name("test CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    (folder / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))

    def issue(cn: str, stem: str) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ), critical=False)
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ), critical=False)
            .sign(ca_key, hashes.SHA256())
        )  # fmt: skip
        (folder / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        write_key(key, folder / f"{stem}-key.pem")

    issue("ramp dask cluster", "cluster")
    issue("ramp-dispatcher", "daemon")
    return TlsFiles(
        folder / "ca.pem", folder / "cluster.pem", folder / "cluster-key.pem",
        folder / "daemon.pem", folder / "daemon-key.pem",
    )


class DaskCluster:
    """A scheduler and named Dask workers, started and stopped by the tests."""

    def __init__(
        self, hidden: list[Path], tls: TlsFiles | None = None, worker_ttl: str = "4s",
        masked: list[Path] | None = None,
    ):  # fmt: skip
        # Outside every hidden folder: the Dask workers' own scratch and cache.
        self.dir = Path(tempfile.mkdtemp(prefix="rd-dask-", dir="/tmp"))
        self.hidden = [Path(h) for h in hidden]
        #: files the Dask workers see as /dev/null (e.g. bwrap: a host without it)
        self.masked = [Path(m) for m in masked or []]
        self.tls = tls
        self.port = free_port()
        self.marker = uuid.uuid4().hex
        self.worker_ttl = worker_ttl
        self.scheduler: subprocess.Popen[bytes] | None = None
        self.workers: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def address(self) -> str:
        return f"{'tls' if self.tls else 'tcp'}://127.0.0.1:{self.port}"

    def _env(self, name: str) -> dict[str, str]:
        env = dict(os.environ)
        env[MARKER_VAR] = self.marker
        env["PYTHONUNBUFFERED"] = "1"
        # A silent worker is dropped after this long (the default is 5 min).
        env["DASK_DISTRIBUTED__SCHEDULER__WORKER_TTL"] = self.worker_ttl
        home = self.dir / name
        home.mkdir(exist_ok=True)
        env["TMPDIR"] = str(home)
        env["RAMP_DISPATCHER_CACHE"] = str(home / "cache")
        return env

    def _tls_args(self) -> list[str]:
        if self.tls is None:
            return []
        return ["--tls-ca-file", str(self.tls.ca), "--tls-cert", str(self.tls.cert),
                "--tls-key", str(self.tls.key)]  # fmt: skip

    def start_scheduler(self) -> None:
        argv = [str(DASK_EXE), "scheduler", "--host", "127.0.0.1", "--port", str(self.port),
                "--no-dashboard", *self._tls_args()]  # fmt: skip
        if self.tls:
            argv += ["--protocol", "tls"]
        with open(self.dir / "scheduler.log", "ab") as log:
            self.scheduler = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=self._env("scheduler"),
            )  # fmt: skip
        wait_for(lambda: "Scheduler at" in self.log("scheduler"), 60, "the scheduler to listen")

    def stop_scheduler(self, sig: int = signal.SIGKILL) -> None:
        if self.scheduler is not None and self.scheduler.poll() is None:
            self.scheduler.send_signal(sig)
            self.scheduler.wait(30)
        self.scheduler = None

    def start_worker(self, name: str) -> None:
        self.start_workers([name])

    def start_workers(self, names: list[str]) -> None:
        """``dask worker`` processes, each in a mount namespace where the
        hidden folders are empty; started together, then waited for."""
        counts = {}
        for name in names:
            dask_argv = [
                str(DASK_EXE), "worker", self.address, "--name", name, "--nthreads", "1",
                "--resources", "ramp=1", "--no-nanny", "--no-dashboard", "--host", "127.0.0.1",
                "--local-directory", str(self.dir / name / "scratch"), "--death-timeout", "60",
                *self._tls_args(),
            ]  # fmt: skip
            mounts = "".join(
                f"mount -t tmpfs -o size=1m,mode=0755 none {shlex.quote(str(h))} || exit 97\n"
                for h in self.hidden
            ) + "".join(f"mount --bind /dev/null {shlex.quote(str(m))} || exit 97\n" for m in self.masked)
            script = mounts + "exec " + " ".join(shlex.quote(a) for a in dask_argv)
            counts[name] = self.log(name).count("Registered to")
            with open(self.dir / f"{name}.log", "ab") as log:
                # unshare execs sh, which execs the worker: one pid throughout
                self.workers[name] = subprocess.Popen(
                    ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    env=self._env(name),
                )  # fmt: skip
        for name in names:
            wait_for(
                lambda: self.log(name).count("Registered to") > counts[name] or self._dead(name),
                60, f"Dask worker {name} to register",
            )  # fmt: skip
            if self._dead(name):
                raise RuntimeError(f"Dask worker {name} exited:\n{self.log(name)[-3000:]}")

    def _dead(self, name: str) -> bool:
        return self.workers[name].poll() is not None

    def log(self, name: str) -> str:
        try:
            return (self.dir / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""

    def log_tails(self, chars: int = 4000) -> str:
        """The end of the scheduler's and each Dask worker's log."""
        return "\n".join(f"----- {name}.log (end) -----\n{self.log(name)[-chars:]}"
                         for name in ["scheduler", *self.workers])  # fmt: skip

    def worker_pid(self, name: str) -> int:
        return self.workers[name].pid

    def kill_worker(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.workers[name]
        proc.send_signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            proc.wait(30)

    def ensure(self, names: tuple[str, ...] = ("w1", "w2")) -> None:
        """Scheduler and workers up (a test may have killed some)."""
        if self.scheduler is None or self.scheduler.poll() is not None:
            self.start_scheduler()
        missing = []
        for name in names:
            proc = self.workers.get(name)
            if proc is not None and proc.poll() is None:
                try:
                    os.kill(proc.pid, signal.SIGCONT)
                except OSError:
                    pass
            if proc is None or proc.poll() is not None:
                missing.append(name)
        if missing:
            self.start_workers(missing)

    def cache_trees(self, name: str) -> list[str]:
        """Digests of the kit/data trees in a Dask worker's cache."""
        trees = self.dir / name / "cache" / "trees"
        return sorted(p.name for p in trees.iterdir() if not p.name.startswith(".")) if trees.is_dir() else []

    def ramp_tests(self, submission_name: str | None = None) -> list[int]:
        """Live ramp-test processes on the Dask workers."""
        if submission_name is not None:
            return ramp_test_pids(self.marker, submission_name)
        return [p for p in marked_pids(self.marker)
                if any(a.endswith(b"/ramp-test") for a in _argv(p)[:2])]  # fmt: skip

    def spares(self, name: str) -> list[int]:
        """The idle spare supervisors (``supervise-*.py --spare``) of a Dask worker."""
        worker = self.workers[name]
        if worker.poll() is not None:
            return []
        return [p for p in marked_pids(self.marker)
                if _argv(p)[-2:] == [b"--spare", b""] and _descends_from(p, worker.pid)]  # fmt: skip

    def runner_of(self, submission_name: str) -> str | None:
        """The Dask worker whose process tree runs the submission's ramp-test."""
        for pid in self.ramp_tests(submission_name):
            for name, proc in self.workers.items():
                if proc.poll() is None and _descends_from(pid, proc.pid):
                    return name
        return None

    def close(self) -> None:
        for proc in self.workers.values():
            if proc.poll() is None:
                try:
                    os.kill(proc.pid, signal.SIGCONT)
                except OSError:
                    pass
                proc.kill()
                proc.wait(30)
        self.stop_scheduler()
        kill_marked(self.marker)
        shutil.rmtree(self.dir, ignore_errors=True)


def _argv(pid: int) -> list[bytes]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def _descends_from(pid: int, ancestor: int) -> bool:
    for _ in range(50):
        if pid == ancestor:
            return True
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                data = f.read()
            pid = int(data.rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
        if pid <= 1:
            return False
    return False
