"""The aws worker's SSH connection to an instance.

:class:`SshConnection` is one paramiko transport whose host key is checked
against a set of trusted SHA256 fingerprints *before* we authenticate (there
is no known_hosts to add to and nothing is ever accepted on first sight). It
runs commands with a deadline and copies folders over SFTP. What the worker
runs through it is :mod:`.remote`.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

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
        for i, word in enumerate(fields[:-1]):
            if word.startswith(("ssh-", "ecdsa-", "sk-")):
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
class BastionKeyMismatch(HostKeyMismatch):
    """The bastion is not the host ``ssh_proxy_known_hosts_file`` pins."""


def _handshake(
    sock: Any,
    where: str,
    user: str,
    key: paramiko.PKey,
    trusted: frozenset[str],
    timeout: float,
    trusted_from: str,
    mismatch: type[HostKeyMismatch] = HostKeyMismatch,
) -> paramiko.Transport:
    """An authenticated transport over ``sock``, its host key checked first."""
    transport = paramiko.Transport(sock)
    transport.banner_timeout = timeout
    transport.handshake_timeout = timeout
    transport.auth_timeout = timeout
    try:
        transport.start_client(timeout=timeout)
        server_key = transport.get_remote_server_key()
        # Checked before authenticating: an impostor learns nothing.
        if server_key.fingerprint not in trusted:
            raise mismatch(
                f"{where} presented the {server_key.get_name()} host key "
                f"{server_key.fingerprint}, which is not among the "
                f"{len(trusted)} key(s) {trusted_from}: refusing to connect"
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
    return transport


@dataclass(frozen=True)
class JumpHost:
    """A bastion (``ssh_proxy_jump``) with its own key and pinned host keys."""

    user: str
    host: str
    port: int
    key: paramiko.PKey = field(repr=False)
    trusted: frozenset[str]

    @property
    def where(self) -> str:
        return f"bastion {self.host}:{self.port}"

    def connect(self, timeout: float) -> paramiko.Transport:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=timeout)
        except OSError as exc:
            raise SshError(f"cannot connect to the {self.where}: {exc.strerror or exc}") from None
        return _handshake(
            sock,
            self.where,
            self.user,
            self.key,
            self.trusted,
            timeout,
            "of ssh_proxy_known_hosts_file",
            BastionKeyMismatch,
        )


@dataclass(frozen=True)
class CommandResult:
    exit_code: int
    stdout: str
    stderr: str


class SshConnection:
    """One authenticated SSH transport to one instance."""

    def __init__(
        self,
        transport: paramiko.Transport,
        where: str,
        op_timeout: float,
        bastion: paramiko.Transport | None = None,
    ):
        self.transport = transport
        self.where = where
        self.op_timeout = op_timeout
        self.bastion = bastion
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
        jump: JumpHost | None = None,
    ) -> SshConnection:
        """Connect and authenticate, through ``jump`` when given (a bastion:
        its own key and host-key check, a ``direct-tcpip`` channel to the
        instance; no ``ssh`` binary)."""
        where = f"{host}:{port}"
        bastion: paramiko.Transport | None = None
        if jump is None:
            try:
                sock: Any = socket.create_connection((host, port), timeout=connect_timeout)
            except OSError as exc:
                raise SshError(f"cannot connect to {where}: {exc.strerror or exc}") from None
        else:
            bastion = jump.connect(connect_timeout)
            try:
                sock = bastion.open_channel(
                    "direct-tcpip", (host, port), ("127.0.0.1", 0), timeout=connect_timeout
                )
            except (paramiko.SSHException, OSError, EOFError) as exc:
                bastion.close()
                raise SshError(
                    f"the bastion {jump.where} cannot reach {where}: {_describe(exc)}"
                ) from None
            where = f"{where} via {jump.where}"
        try:
            transport = _handshake(
                sock, where, user, key, trusted, connect_timeout, "the instance published"
            )
        except SshError:
            if bastion is not None:
                bastion.close()
            raise
        return cls(transport, where, op_timeout, bastion)

    @property
    def alive(self) -> bool:
        return self.transport.is_active() and (self.bastion is None or self.bastion.is_active())

    def close(self) -> None:
        try:
            if self._sftp is not None:
                self._sftp.close()
        except Exception:
            pass
        self._sftp = None
        self.transport.close()
        if self.bastion is not None:
            self.bastion.close()

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

    def download_tail(self, remote: str, local: Path, max_bytes: int) -> bool:
        """Copy at most the last ``max_bytes`` of one remote file (a log: its
        end holds the traceback); a line at the top says what was left out.
        False when it does not exist."""
        sftp = self.sftp()
        try:
            size = sftp.stat(remote).st_size or 0
        except FileNotFoundError:
            return False
        except (OSError, paramiko.SSHException, EOFError) as exc:
            raise SshError(f"{self.where}: cannot stat {remote}: {_describe(exc)}") from None
        if size <= max_bytes:
            return self.download_file(remote, local)
        try:
            local.parent.mkdir(parents=True, exist_ok=True)
            with sftp.open(remote, "rb") as src, open(local, "wb") as dest:
                src.seek(size - max_bytes)
                data = src.read(max_bytes)
                newline = data.find(b"\n", 0, 4096)  # start on a line of its own
                if newline >= 0:
                    data = data[newline + 1 :]
                dest.write(
                    f"[ramp-dispatcher] the log's first {size - len(data)} bytes "
                    f"were not downloaded (the log had {size} bytes)\n".encode()
                )
                dest.write(data)
        except (OSError, paramiko.SSHException, EOFError) as exc:
            raise SshError(f"{self.where}: download of {remote} failed: {_describe(exc)}") from None
        return True

    def install_file(self, data: bytes, remote: str) -> None:
        """Put ``data`` at ``remote`` unless a file is there (callers name files
        by their content's digest); written aside, then renamed into place."""
        sftp = self.sftp()
        try:
            sftp.stat(remote)
            return
        except FileNotFoundError:
            pass
        except (OSError, paramiko.SSHException, EOFError) as exc:
            raise SshError(f"{self.where}: cannot stat {remote}: {_describe(exc)}") from None
        tmp = f"{remote}.{os.getpid()}-{time.monotonic_ns()}.tmp"
        try:
            self._makedirs(posixpath.dirname(remote))
            with sftp.open(tmp, "wb") as f:
                f.write(data)
            sftp.posix_rename(tmp, remote)
        except (OSError, paramiko.SSHException, EOFError) as exc:
            raise SshError(f"{self.where}: cannot install {remote}: {_describe(exc)}") from None

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
