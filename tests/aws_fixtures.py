"""Real parts for the aws worker's tests: moto's EC2 server and an OpenSSH sshd.

- :class:`MotoEc2`: ``ThreadedMotoServer`` on 127.0.0.1; boto3 reaches it
  through the worker's ``endpoint_url``. Reset before each test; the test
  account owns one AMI, one key pair (the test client key) and one security group.
- :class:`Sshd`: ``/usr/sbin/sshd`` with generated host and client keys,
  listening on 127.0.0.1, logging in as the current user. It plays every EC2
  instance. Missing sshd skips the tests with the reason, or fails them when
  RAMP_DISPATCHER_REQUIRE_SSHD=1.
- ``bastion``: a second such sshd, the jump host of ``ssh_proxy_jump``.
- :class:`LocalNetwork`: the worker's one seam (``InstanceNetwork``): every
  instance's address is the test sshd, its published host key is the sshd's.
  Two named fakes ride on it, for what moto cannot simulate:
  ``boot_delay`` (SLOW BOOT: an instance has no address for that long) and
  :class:`FakeInstanceMetadata` (SPOT NOTICE: an IMDSv2 endpoint whose
  ``spot/instance-action`` answers 200 once ``interrupt()`` is called).
- :func:`fake_spot_capacity_shortage`: a botocore hook on the worker's client
  that answers spot RunInstances with InsufficientInstanceCapacity (moto
  always grants spot).
- :class:`Ec2Proxy`: an HTTP proxy in front of moto, the worker's
  ``endpoint_url``, for what moto does not do: THROTTLING (answers
  ``RequestLimitExceeded`` to chosen actions a number of times), LOST REPLY
  (forwards a RunInstances and drops its reply), CLIENT TOKEN (answers a
  RunInstances whose ClientToken it saw with the first reply, as EC2 does),
  BAD CREDENTIALS (``AuthFailure`` for one access key id).
- :class:`AwsEnv` and the ``aws_env`` fixture: the worker under test, its
  config, requests and waiting, shared by the ``test_aws_*`` modules.

About 700 lines, over the usual 600: each part is small, and the test
modules share all of them.
"""

from __future__ import annotations

import dataclasses
import getpass
import importlib
import http.server
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import pytest

from helpers import free_port, wait_for
from kit import GOOD, make_iris_kit

from ramp_dispatcher.workers.base import RunOutcome, RunRequest

if TYPE_CHECKING:
    from ramp_dispatcher.workers.aws.config import AWSConfig
    from ramp_dispatcher.workers.aws.worker import AWSWorker

REGION = "eu-west-3"
AMI_NAME = "ramp-iris-worker"
KEY_NAME = "ramp-test-key"
SECURITY_GROUP = "ramp-workers"
SSHD = "/usr/sbin/sshd"
EVENT = "iris_aws"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzz-not-a-real-secret"
ACCESS_KEY = "AKIARAMPDISPATCHTEST"


def _missing(reason: str) -> None:
    if os.environ.get("RAMP_DISPATCHER_REQUIRE_SSHD") == "1":
        pytest.fail(reason)
    print(f"\nSKIP aws worker tests: {reason}")
    pytest.skip(reason)


def _aws_module(name: str) -> None:
    """The 'aws' extra's modules: skipped without them, unless CI requires
    these tests (RAMP_DISPATCHER_REQUIRE_AWS, or _SSHD, which runs them)."""
    required = any(
        os.environ.get(flag) == "1"
        for flag in ("RAMP_DISPATCHER_REQUIRE_AWS", "RAMP_DISPATCHER_REQUIRE_SSHD")
    )
    if not required:
        pytest.importorskip(name)
        return
    try:
        importlib.import_module(name)
    except ImportError as exc:
        pytest.fail(f"the aws worker tests are required but {name} cannot be imported: {exc}",
                    pytrace=False)


def require_aws_modules() -> None:
    """Call at the top of a test module, before importing the aws worker."""
    for name in ("boto3", "paramiko", "moto"):
        _aws_module(name)


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


# ----------------------------------------------------------------- EC2 proxy
class Ec2Proxy:
    """Stand-in for EC2 behaviours moto lacks, in front of moto (see the module)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        #: action -> how many more times it is answered RequestLimitExceeded
        self.throttle: dict[str, int] = {}
        self.throttled: list[str] = []
        #: drop the reply of this many RunInstances calls (after moto made the instance)
        self.lose_run_instances_replies = 0
        #: ClientToken -> moto's reply to the first RunInstances that carried it
        self.tokens: dict[str, tuple[int, bytes]] = {}
        self.run_instances_tokens: list[str | None] = []
        self.rejected_access_key: str | None = None
        self.actions: list[str] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _reply(self, code: int, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "text/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                form = urllib.parse.parse_qs(body.decode())
                action = form.get("Action", [""])[0]
                with proxy.lock:
                    proxy.actions.append(action)
                    if proxy.throttle.get(action, 0) > 0:
                        proxy.throttle[action] -= 1
                        proxy.throttled.append(action)
                        limit = _ec2_error("RequestLimitExceeded", "Request limit exceeded.")
                        self._reply(503, limit)
                        return
                auth = self.headers.get("Authorization", "")
                if proxy.rejected_access_key and f"Credential={proxy.rejected_access_key}/" in auth:
                    refusal = "AWS was not able to validate the provided access credentials"
                    self._reply(401, _ec2_error("AuthFailure", refusal))
                    return
                token = form.get("ClientToken", [None])[0] if action == "RunInstances" else None
                if action == "RunInstances":
                    with proxy.lock:
                        proxy.run_instances_tokens.append(token)
                        seen = proxy.tokens.get(token) if token else None
                    if seen is not None:  # EC2's idempotency: the same reply, no new instance
                        self._reply(*seen)
                        return
                code, data = proxy.forward(self.path, body, self.headers)
                if action == "RunInstances":
                    with proxy.lock:
                        if token and code == 200:
                            proxy.tokens[token] = (code, data)
                        lose = proxy.lose_run_instances_replies > 0
                        if lose:
                            proxy.lose_run_instances_replies -= 1
                    if lose:  # LOST REPLY: the instance exists, the caller never hears of it
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
                self._reply(code, data)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def forward(self, path: str, body: bytes, headers: Any) -> tuple[int, bytes]:
        request = urllib.request.Request(self.upstream + path, data=body, method="POST")
        for name in ("Content-Type", "Authorization", "X-Amz-Date", "User-Agent"):
            if headers.get(name):
                request.add_header(name, headers[name])
        try:
            with urllib.request.urlopen(request, timeout=30) as reply:
                return reply.status, reply.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _ec2_error(code: str, message: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error>'
        f"<Code>{code}</Code><Message>{message}</Message></Error></Errors>"
        "<RequestID>ramp-test-proxy</RequestID></Response>"
    ).encode()


# ------------------------------------------------------------------------ sshd
class Sshd:
    """A real OpenSSH server on 127.0.0.1 that plays every instance."""

    def __init__(self, root: Path, extra_config: str = ""):
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
{extra_config}""")
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


@pytest.fixture(scope="session")
def bastion(sshd: Sshd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    """A second sshd on 127.0.0.1 playing the bastion (ssh_proxy_jump). It logs
    its direct-tcpip channels (DEBUG1), so a test sees what went through it."""
    server = Sshd(tmp_path_factory.mktemp("bastion"), "AllowTcpForwarding yes\nLogLevel DEBUG1\n")
    try:
        server.start()
    except RuntimeError as exc:
        _missing(f"cannot start the bastion sshd: {exc}")
    yield server
    server.stop()


@pytest.fixture
def ec2_proxy(moto_ec2: MotoEc2) -> Iterator[Ec2Proxy]:
    proxy = Ec2Proxy(moto_ec2.url)
    yield proxy
    proxy.stop()


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


# ------------------------------------------------------- the worker under test
def sleeping_good(seconds: float, probe_dir: Path | None = None) -> str:
    """A working classifier whose fit sleeps; with ``probe_dir``, each process
    that imports it leaves a file named by its pid there."""
    probe = ""
    if probe_dir is not None:
        probe = f"pathlib.Path({str(probe_dir)!r}, str(os.getpid())).touch()\n"
    return (
        "import os\nimport pathlib\nimport time\n"
        + probe
        + GOOD.replace(
            "        self.clf.fit(X, y)",
            f"        time.sleep({float(seconds)!r})\n        self.clf.fit(X, y)",
        )
    )


# --------------------------------------------------------------------- helpers
@dataclasses.dataclass
class AwsEnv:
    moto: MotoEc2
    sshd: Sshd
    network: LocalNetwork
    tmp: Path
    kit: Path  # the "image's" kit folder, on this machine through the sshd
    workers: list[AWSWorker] = dataclasses.field(default_factory=list)

    def settings(self, **over: Any) -> dict[str, Any]:
        values: dict[str, Any] = dict(
            access_key_id=ACCESS_KEY,
            secret_access_key=SECRET,
            region_name=REGION,
            endpoint_url=self.moto.url,
            ami_image_name=AMI_NAME,
            ami_user_name=self.sshd.user,
            instance_type="t3.micro",
            key_name=KEY_NAME,
            key_path=self.sshd.client_key,
            security_group=SECURITY_GROUP,
            remote_ramp_kit_folder=str(self.kit),
            remote_python_env=None,  # the image's login shell activates this environment
            local_predictions_folder=self.tmp / "downloads" / "predictions",
            local_log_folder=self.tmp / "downloads" / "logs",
            memory_profiling=True,
            timeout=120.0,
            boot_timeout=30.0,
            ssh_connect_timeout=5.0,
            ssh_command_timeout=20.0,
            unreachable_timeout=30.0,
            poll_interval=0.2,
            terminate_timeout=10.0,
        )
        values.update(over)
        return values

    def config(self, **over: Any) -> AWSConfig:
        from ramp_dispatcher.workers.aws.config import AWSConfig

        return AWSConfig(**self.settings(**over))

    def worker(self, config: AWSConfig | None = None, event: str = EVENT) -> AWSWorker:
        from ramp_dispatcher.workers.aws.worker import AWSWorker

        w = AWSWorker(config or self.config(), event, network=self.network)
        self.workers.append(w)
        return w

    def request(self, source: str, submission_id: int = 1, attempt: int = 1) -> RunRequest:
        name = f"submission_{submission_id:09d}"
        folder = self.tmp / "submissions" / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "classifier.py").write_text(source)
        return RunRequest(
            submission_id=submission_id,
            submission_name=name,
            attempt=attempt,
            kit_dir=self.kit,
            data_dir=self.kit,
            submissions_dir=self.tmp / "submissions",
            logs_dir=self.tmp / "logs",
            predictions_dir=self.tmp / "predictions",
            n_threads=1,
        )

    def wait(
        self, worker: AWSWorker, request: RunRequest, handle: dict[str, Any], timeout: float = 90.0
    ) -> RunOutcome:
        """Call check() as the dispatcher would; every call must return at once."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            outcome = worker.check(request, handle)
            # check() takes microseconds; a blocking SSH or EC2 call takes
            # seconds. Not tighter: moto's in-process server competes for the
            # GIL, and a parallel test process for the CPU.
            assert time.monotonic() - t0 < 1.0, "check() blocked the loop"
            if outcome is not None:
                return outcome
            time.sleep(0.2)
        raise AssertionError(f"no outcome within {timeout} s")

    wait_for = staticmethod(wait_for)  # tests/helpers.py's, at hand on the fixture

    def live_instances(self) -> list[dict[str, Any]]:
        return self.moto.instances(("pending", "running", "stopping", "stopped"))

    def assert_no_instance_running(self) -> None:
        # Termination is confirmed before the outcome is out; allow the
        # cleanup threads (tag-based) a moment.
        self.wait_for(lambda: not self.live_instances(), 10, "every instance to be terminated")

    def remote_pid(self, handle: dict[str, Any]) -> int | None:
        path = Path(handle["remote_run_dir"]) / "pid"
        return int(path.read_text()) if path.exists() else None

    def ramp_test_group(self, handle: dict[str, Any]) -> int | None:
        """ramp-test's own process group (the supervisor starts it in one)."""
        path = Path(handle["remote_run_dir"]) / "status.json"
        return json.loads(path.read_text()).get("child_pid") if path.exists() else None

    def group_alive(self, pgid: int) -> bool:
        from ramp_dispatcher.workers.supervise import all_processes

        return any(p.pgid == pgid and p.state not in ("Z", "X") for p in all_processes())


def kill_leftover_runs(kit: Path) -> None:
    """A failed test must not leave ramp-test running on this machine."""
    import os
    import signal

    for pid_file in kit.glob(".ramp-dispatcher/*/pid"):
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)
        except (OSError, ValueError):
            pass


@pytest.fixture
def aws_env(
    moto_ec2: MotoEc2, sshd: Sshd, network: LocalNetwork, tmp_path: Path  # noqa: F811
) -> Iterator[AwsEnv]:
    moto_ec2.reset(sshd.client_public_key)
    kit = make_iris_kit(tmp_path / "instance" / "ramp-kits" / "iris")
    env = AwsEnv(moto_ec2, sshd, network, tmp_path, kit)
    yield env
    for w in env.workers:
        w.close()
    kill_leftover_runs(kit)
    if sshd.proc is None:
        sshd.start()


def outcome_ok(outcome: RunOutcome, request: RunRequest) -> None:
    assert outcome.failure is None, outcome.message
    assert outcome.output_dir == request.output_dir
    assert (request.output_dir / "bagged_scores.csv").is_file()
    assert (request.output_dir / "fold_0" / "scores.csv").is_file()
    assert request.log_path.is_file() and request.log_path.stat().st_size > 0
    assert outcome.max_ram_mb is not None and outcome.max_ram_mb > 10  # Python + sklearn


def event_yaml(worker: dict[str, Any], event: str = EVENT) -> str:
    """An event config (ramp-board format) with this aws worker section."""
    lines = [
        f"  {k}: {json.dumps(str(v) if isinstance(v, Path) else v)}" for k, v in worker.items()
    ]
    return textwrap.dedent(f"""\
        ramp:
          problem_name: iris
          event_name: {event}
          event_title: Iris on EC2
          event_is_public: true
        worker:
          worker_type: aws
        """) + "\n".join(lines) + "\n"
