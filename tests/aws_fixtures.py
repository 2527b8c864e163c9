"""Real parts for the aws worker's tests: moto's EC2 server and an OpenSSH sshd.

- :class:`MotoEc2`: ``ThreadedMotoServer`` on 127.0.0.1; boto3 reaches it
  through the worker's ``endpoint_url``. Reset before each test; the test
  account owns one AMI, one key pair (the test client key) and one security group.
- :class:`Sshd`: ``/usr/sbin/sshd`` with generated host and client keys,
  listening on 127.0.0.1, logging in as the current user. It plays every EC2
  instance. Missing sshd skips the tests with the reason, or fails them when
  RAMP_DISPATCHER_REQUIRE_SSHD=1.
- :class:`LocalNetwork`: the worker's one seam (``InstanceNetwork``): every
  instance's address is the test sshd, its published host key is the sshd's.
  Two named fakes ride on it, for what moto cannot simulate:
  ``boot_delay`` (SLOW BOOT: an instance has no address for that long) and
  :class:`FakeInstanceMetadata` (SPOT NOTICE: an IMDSv2 endpoint whose
  ``spot/instance-action`` answers 200 once ``interrupt()`` is called).
- :func:`fake_spot_capacity_shortage`: a botocore hook on the worker's client
  that answers spot RunInstances with InsufficientInstanceCapacity (moto
  always grants spot).
"""

from __future__ import annotations

import getpass
import http.server
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

from helpers import free_port

REGION = "eu-west-3"
AMI_NAME = "ramp-iris-worker"
KEY_NAME = "ramp-test-key"
SECURITY_GROUP = "ramp-workers"
SSHD = "/usr/sbin/sshd"


def _missing(reason: str) -> None:
    if os.environ.get("RAMP_DISPATCHER_REQUIRE_SSHD") == "1":
        pytest.fail(reason)
    print(f"\nSKIP aws worker tests: {reason}")
    pytest.skip(reason)


# ------------------------------------------------------------------------ moto
class MotoEc2:
    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "ec2",
            region_name=REGION,
            endpoint_url=self.url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def reset(self, client_public_key: str) -> str:
        """Empty moto; give the account its AMI, key pair and group; return the AMI id."""
        req = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST")
        urllib.request.urlopen(req, timeout=10).read()
        ec2 = self.client()
        ec2.import_key_pair(KeyName=KEY_NAME, PublicKeyMaterial=client_public_key.encode())
        ec2.create_security_group(GroupName=SECURITY_GROUP, Description="ramp workers")
        image = ec2.register_image(
            Name=AMI_NAME,
            RootDeviceName="/dev/sda1",
            BlockDeviceMappings=[{"DeviceName": "/dev/sda1", "Ebs": {"VolumeSize": 8}}],
        )
        return image["ImageId"]

    def instances(self, states: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
        filters = (
            [] if states is None else [{"Name": "instance-state-name", "Values": list(states)}]
        )
        found = []
        for r in self.client().describe_instances(Filters=filters)["Reservations"]:
            found += r["Instances"]
        return found

    def stop(self) -> None:
        self.server.stop()


# ------------------------------------------------------------------------ sshd
class Sshd:
    """A real OpenSSH server on 127.0.0.1 that plays every instance."""

    def __init__(self, root: Path):
        self.root = root
        self.user = getpass.getuser()
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        root.mkdir(parents=True, exist_ok=True)
        self.host_key = root / "ssh_host_ed25519_key"
        self.client_key = root / "client_key"
        for path in (self.host_key, self.client_key):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ramp-test", "-f", str(path)],
                check=True,
                stdin=subprocess.DEVNULL,
            )
        self.client_public_key = (root / "client_key.pub").read_text()
        (root / "authorized_keys").write_text(self.client_public_key)
        # The fingerprint as OpenSSH itself prints it: "256 SHA256:... comment (ED25519)".
        out = subprocess.run(
            ["ssh-keygen", "-l", "-f", f"{self.host_key}.pub"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        self.host_fingerprint = out.split()[1]
        # The "image user's" home: sshd sessions must not run this machine's
        # dotfiles (a slow ~/.bashrc would stall every command). Its
        # ~/.profile activates the environment, as the AMI recipe does.
        self.home = root / "home"
        self.home.mkdir()
        (self.home / ".bashrc").write_text("# the test instance's (empty) bashrc\n")
        (self.home / ".profile").write_text(
            f'PATH="{sys.prefix}/bin:$PATH"; export PATH  # as `conda activate` in the AMI recipe\n'
        )
        self.config = root / "sshd_config"
        self.config.write_text(f"""\
Port {self.port}
ListenAddress 127.0.0.1
HostKey {self.host_key}
PidFile {root / "sshd.pid"}
AuthorizedKeysFile {root / "authorized_keys"}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
AllowUsers {self.user}
StrictModes no
UsePAM no
MaxStartups 50:30:100
Subsystem sftp internal-sftp
SetEnv HOME={self.home}
""")
        self.log = root / "sshd.log"

    def start(self) -> None:
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", exist_ok=True)  # privilege separation directory
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(self.config), "-p", str(self.port)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    if s.recv(64).startswith(b"SSH-"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"sshd did not answer: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        """Kill the listener and every connection it serves (runs started over
        it left its process tree with setsid and survive, as on a real host)."""
        from ramp_dispatcher.workers.supervise import descendants

        if self.proc is None:
            return
        children = [p.pid for p in descendants(self.proc.pid)]
        for pid in [self.proc.pid, *children]:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        self.proc.wait()
        self.proc = None


# ------------------------------------------------------------- instance metadata
class FakeInstanceMetadata:
    """SPOT NOTICE fake: an IMDSv2 service on 127.0.0.1 (moto has no IMDS)."""

    def __init__(self) -> None:
        self.token = "fake-imds-token"
        self.notice: dict[str, str] | None = None
        self.requests: list[tuple[str, str]] = []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _reply(self, code: int, body: str = "") -> None:
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_PUT(self) -> None:
                fake.requests.append(("PUT", self.path))
                if self.path == "/latest/api/token" and self.headers.get(
                    "X-aws-ec2-metadata-token-ttl-seconds"
                ):
                    self._reply(200, fake.token)
                else:
                    self._reply(400)

            def do_GET(self) -> None:
                fake.requests.append(("GET", self.path))
                if self.headers.get("X-aws-ec2-metadata-token") != fake.token:
                    self._reply(401)  # IMDSv2 only, as the worker's instances are launched
                elif self.path == "/latest/meta-data/spot/instance-action" and fake.notice:
                    self._reply(200, json.dumps(fake.notice))
                else:
                    self._reply(404)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def interrupt(self) -> None:
        self.notice = {
            "action": "terminate",
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ------------------------------------------------------------------------ seam
@dataclass
class LocalNetwork:
    """The test ``InstanceNetwork``: every instance is the local test sshd."""

    sshd: Sshd
    imds: FakeInstanceMetadata
    #: SLOW BOOT fake: an instance has no address for this long after first asked
    boot_delay: float = 0.0
    #: the fingerprints "published" by instances (default: the sshd's real one)
    published_keys: frozenset[str] | None = None
    first_seen: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def address(self, instance: Any) -> tuple[str, int] | None:
        with self.lock:
            first = self.first_seen.setdefault(instance.instance_id, time.monotonic())
        if time.monotonic() - first < self.boot_delay:
            return None
        return ("127.0.0.1", self.sshd.port)

    def host_keys(self, instance: Any) -> frozenset[str] | None:
        return self.published_keys or frozenset({self.sshd.host_fingerprint})

    def metadata_url(self, instance: Any) -> str:
        return self.imds.url


def fake_spot_capacity_shortage(client: Any) -> list[dict[str, Any]]:
    """SPOT SHORTAGE fake: spot RunInstances fails as AWS does without capacity.

    Returns the list of RunInstances calls seen (their parameters)."""
    from botocore.awsrequest import AWSResponse

    calls: list[dict[str, Any]] = []

    def before_call(params: dict[str, Any], **_: Any) -> Any:
        body = params.get("body") or {}
        calls.append(dict(body))
        if any(k.startswith("InstanceMarketOptions") for k in body):
            error = {
                "Code": "InsufficientInstanceCapacity",
                "Message": "There is no Spot capacity available that matches your request.",
            }
            response = AWSResponse("https://ec2.fake", 400, {}, None)
            return response, {"Error": error, "ResponseMetadata": {"HTTPStatusCode": 400}}
        return None

    client.meta.events.register("before-call.ec2.RunInstances", before_call)
    return calls


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def moto_ec2() -> Iterator[MotoEc2]:
    server = MotoEc2()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    if not os.path.isfile(SSHD):
        _missing(f"{SSHD} not found (apt-get install openssh-server)")
    if shutil.which("ssh-keygen") is None:
        _missing("ssh-keygen not found (apt-get install openssh-client)")
    server = Sshd(tmp_path_factory.mktemp("sshd"))
    try:
        server.start()
    except RuntimeError as exc:
        _missing(f"cannot start the test sshd: {exc}")
    yield server
    server.stop()


@pytest.fixture
def imds() -> Iterator[FakeInstanceMetadata]:
    fake = FakeInstanceMetadata()
    yield fake
    fake.stop()


@pytest.fixture
def network(sshd: Sshd, imds: FakeInstanceMetadata) -> LocalNetwork:
    if sshd.proc is None:  # a test killed it and failed before restarting it
        sshd.start()
    return LocalNetwork(sshd, imds)
