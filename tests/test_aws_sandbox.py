"""The aws worker's runs on the instance: the sandbox, and the bounded log.

Real parts as in test_aws_worker.py: moto's EC2 server, a real OpenSSH sshd
playing the instance, real ``ramp-test``, real bubblewrap on the "instance".
One fake, named: IMAGE WITHOUT BWRAP, an sshd whose sessions run in a mount
namespace where ``/usr/bin/bwrap`` is ``/dev/null`` (an image that lacks it).
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import textwrap
import threading
from pathlib import Path
from typing import Iterator

import pytest

from aws_fixtures import require_aws_modules

require_aws_modules()

from aws_fixtures import (  # noqa: E402
    EVENT,
    AwsEnv,
    LocalNetwork,
    Sshd,
    _missing,
    aws_env,  # noqa: F401  (fixtures)
    event_yaml,
    imds,  # noqa: F401
    moto_ec2,  # noqa: F401
    network,  # noqa: F401
    outcome_ok,
    sshd,  # noqa: F401
)
from kit import GOOD  # noqa: E402

from ramp_dispatcher.workers.base import FailureClass  # noqa: E402

SSH_SECRET = "ssh-secret-of-the-login-user"
OUTSIDE_SECRET = "a-file-outside-the-run-folders"


class Listener:
    """A TCP listener on 127.0.0.1 that counts who connects."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    server = Listener()
    yield server
    server.close()


def attacking_source(targets: dict[str, object]) -> str:
    """A submission whose fit tries to read, connect and leak; it prints what it
    got on a line ``ATTACKS {json}`` and then fails (rampwf's keyword filter
    forbids " open": files are read through pathlib)."""
    return textwrap.dedent(f"""\
        import json
        import pathlib
        import socket
        import urllib.request

        from sklearn.base import BaseEstimator
        from sklearn.linear_model import LogisticRegression

        T = json.loads({json.dumps(json.dumps(targets))})


        def attempt(results, name, fn):
            try:
                results[name] = "LEAKED " + repr(fn())[:200]
            except Exception as exc:
                results[name] = "blocked " + type(exc).__name__


        def metadata():
            token = urllib.request.Request(
                T["imds"] + "/latest/api/token", method="PUT",
                headers={{"X-aws-ec2-metadata-token-ttl-seconds": "60"}})
            return urllib.request.urlopen(token, timeout=3).read()


        class Classifier(BaseEstimator):
            def __init__(self):
                self.clf = LogisticRegression(max_iter=500)

            def fit(self, X, y):
                r = {{}}
                attempt(r, "ssh_key", lambda: pathlib.Path(T["ssh_key"]).read_text())
                attempt(r, "outside_file", lambda: pathlib.Path(T["outside"]).read_text())
                attempt(r, "other_submission", lambda: pathlib.Path(T["other"]).read_text())
                attempt(r, "tcp_listener", lambda: socket.create_connection(
                    ("127.0.0.1", T["port"]), timeout=3).sendall(b"hello"))
                attempt(r, "metadata_service", metadata)
                print("ATTACKS " + json.dumps(r), flush=True)
                raise RuntimeError("attacks done")

            def predict_proba(self, X):
                return self.clf.predict_proba(X)
        """)


def attack_results(log: Path) -> dict[str, str]:
    line = next(ln for ln in log.read_text().splitlines() if ln.startswith("ATTACKS "))
    return json.loads(line.split(" ", 1)[1])


def test_sandbox_on_the_instance_keeps_keys_files_and_network_out_of_reach(
    aws_env: AwsEnv, listener: Listener
) -> None:
    home = aws_env.sshd.home  # the login user's home on the "instance"
    (home / ".ssh").mkdir(exist_ok=True)
    ssh_key = home / ".ssh" / "authorized_keys"
    ssh_key.write_text(SSH_SECRET)
    outside = aws_env.tmp / "outside.txt"
    outside.write_text(OUTSIDE_SECRET)
    other = aws_env.kit / "submissions" / "starting_kit" / "classifier.py"
    imds_fake = aws_env.network.imds
    targets = {"ssh_key": str(ssh_key), "outside": str(outside), "other": str(other),
               "port": listener.port, "imds": imds_fake.url}  # fmt: skip

    worker = aws_env.worker()  # the default: sandbox bwrap
    hostile = aws_env.request(attacking_source(targets), submission_id=1)
    normal = aws_env.request(GOOD, submission_id=2)
    hostile_handle = worker.start(hostile, lambda: None)
    normal_handle = worker.start(normal, lambda: None)
    outcome_ok(aws_env.wait(worker, normal, normal_handle), normal)  # still scores
    outcome = aws_env.wait(worker, hostile, hostile_handle)
    assert outcome.failure is FailureClass.PARTICIPANT, outcome.message
    results = attack_results(hostile.log_path)
    assert set(results) == {"ssh_key", "outside_file", "other_submission", "tcp_listener",
                            "metadata_service"}  # fmt: skip
    assert all(v.startswith("blocked") for v in results.values()), results
    assert listener.connections == 0 and imds_fake.requests == []
    downloaded = [hostile.log_path, *hostile.output_dir.rglob("*")]
    for path in (p for p in downloaded if p.is_file()):
        text = path.read_text(errors="replace")
        assert SSH_SECRET not in text and OUTSIDE_SECRET not in text, path

    # The same submission without the sandbox gets everything: the test can fail.
    bare = aws_env.worker(aws_env.config(sandbox="none"))
    control = aws_env.request(attacking_source(targets), submission_id=3)
    bare_outcome = aws_env.wait(bare, control, bare.start(control, lambda: None))
    assert bare_outcome.failure is FailureClass.PARTICIPANT
    leaked = attack_results(control.log_path)
    assert all(v.startswith("LEAKED") for v in leaked.values()), leaked
    assert SSH_SECRET in leaked["ssh_key"] and listener.connections == 1
    assert ("PUT", "/latest/api/token") in imds_fake.requests
    aws_env.assert_no_instance_running()


def test_forged_scores_are_recomputed_on_the_instance(aws_env: AwsEnv) -> None:
    """A weak model that patches rampwf's score functions inside the sandbox:
    the instance scores its saved predictions again, outside the sandbox, and
    the daemon's side gets those scores (here on the kit's folds: no
    database, but folds handed over as the daemon's reader would, after one
    TryLater: the run waits for them, it is not charged; test_aws_worker's
    lifecycle test has the event's). With ``verify_scores: false`` the forged
    scores are all there is (the test can fail)."""
    from kit import SCORE_NAMES
    from rampwf.utils.testing import assert_read_problem
    from sandbox_attacks import FORGER, probe_classifier

    from ramp_dispatcher.results import parse_training_output
    from ramp_dispatcher.trusted_scores import read_results
    from ramp_dispatcher.workers.aws.worker import AWSWorker
    from rescoring import failing_once

    problem = assert_read_problem(str(aws_env.kit))
    folds = list(problem.get_cv(*problem.get_train_data(path=str(aws_env.kit))))
    cv_folds, calls = failing_once(folds)

    weak = GOOD.replace("LogisticRegression(max_iter=500)", "LogisticRegression(max_iter=1, C=1e-4)")
    assert weak != GOOD
    checked = AWSWorker(aws_env.config(), EVENT, network=aws_env.network, cv_folds=cv_folds)
    aws_env.workers.append(checked)
    bare = aws_env.worker(aws_env.config(verify_scores=False))
    requests = {w: aws_env.request(probe_classifier(FORGER, weak), submission_id=i)
                for i, w in ((1, checked), (2, bare))}  # fmt: skip
    handles = {w: w.start(r, lambda: None) for w, r in requests.items()}  # both at once
    outcomes = {w: aws_env.wait(w, r, handles[w]) for w, r in requests.items()}

    request, outcome = requests[checked], outcomes[checked]
    outcome_ok(outcome, request)
    assert calls == [1, 1]
    assert outcome.trusted_scores == request.log_path.parent / "scores-1.json"
    reported = parse_training_output(request.output_dir, 2, SCORE_NAMES)
    assert reported.bagged.last["acc"]["test"] == 1.0  # what the run claims
    results, note = read_results(request.output_dir, 2, SCORE_NAMES, outcome.trusted_scores)
    assert results.bagged.last["acc"]["test"] < 0.9 and results.folds[0].scores["nll"]["valid"] > 0.5
    assert note.startswith("scores recomputed outside the sandbox differ from what the run reported")

    request, outcome = requests[bare], outcomes[bare]
    outcome_ok(outcome, request)
    assert outcome.trusted_scores is None
    assert parse_training_output(request.output_dir, 2, SCORE_NAMES).bagged.last["acc"]["test"] == 1.0
    aws_env.assert_no_instance_running()


def test_sandbox_none_is_warned_at_start(aws_env: AwsEnv, caplog) -> None:
    worker = aws_env.worker(aws_env.config(sandbox="none"))
    with caplog.at_level(logging.WARNING):
        worker.validate()
    assert "'worker.sandbox' is 'none'" in caplog.text and "WITHOUT a sandbox" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        aws_env.worker().validate()
    assert "WITHOUT a sandbox" not in caplog.text


@pytest.fixture
def sshd_without_bwrap(tmp_path: Path) -> Iterator[Sshd]:
    """IMAGE WITHOUT BWRAP fake: an sshd whose sessions (commands and SFTP)
    run where /usr/bin/bwrap is /dev/null, in a mount namespace of their own."""
    unshare = shutil.which("unshare")
    if unshare is None or shutil.which("bwrap") != "/usr/bin/bwrap":
        _missing("this fake needs unshare, and bwrap at /usr/bin/bwrap")
    wrapper = tmp_path / "no-bwrap-session"
    wrapper.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        if [ "$SSH_ORIGINAL_COMMAND" = internal-sftp ]; then exec /usr/lib/openssh/sftp-server; fi
        exec {unshare} --mount -- /bin/sh -c \\
            'mount --bind /dev/null /usr/bin/bwrap && exec /bin/bash -c "$SSH_ORIGINAL_COMMAND"'
        """))
    wrapper.chmod(0o755)
    server = Sshd(tmp_path / "sshd", f"ForceCommand {wrapper}\n")
    try:
        server.start()
    except RuntimeError as exc:
        _missing(f"cannot start the sshd without bwrap: {exc}")
    yield server
    server.stop()


def test_image_without_bwrap_is_a_configuration_error_found_by_the_first_run(
    aws_env: AwsEnv, sshd_without_bwrap: Sshd
) -> None:
    aws_env.network = LocalNetwork(sshd_without_bwrap, aws_env.network.imds)
    config = aws_env.config(key_path=sshd_without_bwrap.client_key)
    worker = aws_env.worker(config)
    request = aws_env.request(GOOD)
    outcome = aws_env.wait(worker, request, worker.start(request, lambda: None))
    # The platform's failure, never the participant's, and not retried.
    assert outcome.failure is FailureClass.CONFIGURATION
    assert "bubblewrap (bwrap) is not installed" in outcome.message
    assert "worker.sandbox" in outcome.message
    assert not request.log_path.exists()  # nothing ran
    aws_env.assert_no_instance_running()
    # No second instance from that image until the config is reloaded.
    second = aws_env.request(GOOD, submission_id=2)
    outcome = aws_env.wait(worker, second, worker.start(second, lambda: None))
    assert outcome.failure is FailureClass.CONFIGURATION and "not launched" in outcome.message
    assert len(aws_env.moto.instances()) == 1
    # The same image runs with the sandbox explicitly off.
    bare = aws_env.worker(aws_env.config(key_path=sshd_without_bwrap.client_key, sandbox="none"))
    third = aws_env.request(GOOD, submission_id=3)
    outcome_ok(aws_env.wait(bare, third, bare.start(third, lambda: None)), third)
    aws_env.assert_no_instance_running()


def noisy_source(mb: int, ending: str) -> str:
    """An estimator (the demo kit's workflow) whose fit prints ``mb`` MiB, then
    ``ending`` (a statement) ends the run."""
    return textwrap.dedent(f"""\
        import os
        import sys

        from sklearn.base import BaseEstimator, ClassifierMixin


        class Noisy(ClassifierMixin, BaseEstimator):
            def fit(self, X, y):
                line = "x" * 1023 + "\\n"
                for _ in range({mb} * 1024):
                    sys.stdout.write(line)
                sys.stdout.write("LAST WORDS before dying\\n")
                sys.stdout.flush()
                {ending}


        def get_estimator():
            return Noisy()
        """)


def test_log_is_bounded_on_the_instance_and_in_the_download(
    tmp_path: Path, aws_env: AwsEnv
) -> None:
    from deployment import Deployment

    from ramp_dispatcher.config import load_event_config
    from ramp_dispatcher.demo import write_iris_kit
    from ramp_dispatcher.dispatcher import Dispatcher
    from ramp_dispatcher.workers.aws.worker import AWSWorker

    raises = noisy_source(40, 'raise ValueError("gave up after all that output")')
    dep = Deployment(tmp_path / "deploy", f"sqlite:///{tmp_path / 'ramp.sqlite'}",
                     {"raises": raises, "exits": noisy_source(40, "os._exit(3)")})  # fmt: skip
    image_kit = tmp_path / "image-kit"  # the image holds the server's kit
    write_iris_kit(image_kit, image_kit)
    settings = aws_env.settings(remote_ramp_kit_folder=str(image_kit), max_log_mb=1)
    event_path = dep.event_path.with_name("aws-config.yml")
    event_path.write_text(event_yaml(settings, event="iris_demo") + textwrap.dedent("""\
        dispatcher:
          n_workers: 2
          hunger_policy: exit
          poll_interval: 0.5
          time_between_collection: 0.5
        """))
    config = load_event_config(event_path, dep.server)
    worker = AWSWorker(config.worker, "iris_demo", network=aws_env.network)
    aws_env.workers.append(worker)
    d = Dispatcher(dep.engine, config, worker)
    d.start()
    try:
        assert d.stopped.wait(120), "the dispatcher did not finish"
    finally:
        d.stop()

    s = dep.summaries()
    cap = 2**20 + 64 * 1024  # max_log_mb, and what the download allows beyond it
    for name in ("raises", "exits"):
        sub = s[name]
        assert sub.state == "training_error", (name, sub.error_msg)
        remote_logs = list(image_kit.glob(f".ramp-dispatcher/submission_{sub.id:09d}-*/log"))
        saved = config.ramp.logs_dir / f"submission_{sub.id:09d}" / "log"
        assert len(remote_logs) == 1
        for log in (*remote_logs, saved):  # 40 MiB printed: 1 MiB kept, here and there
            assert 0 < log.stat().st_size <= cap, (log, log.stat().st_size)
        text = saved.read_text()
        assert "of output dropped here" in text and "(max_log_mb: 1)" in text
        assert "LAST WORDS before dying" in text  # the tail is kept
    assert "gave up after all that output" in s["raises"].error_msg
    assert s["raises"].error_msg.startswith("Your submission failed: ValueError: gave up")
    assert "exited with code 3" in s["exits"].error_msg
    assert "LAST WORDS before dying" in s["exits"].error_msg
    aws_env.assert_no_instance_running()
