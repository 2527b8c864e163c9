"""The aws worker against moto's EC2 API and a real sshd playing the instances.

Real parts: moto's server (EC2 API), OpenSSH's sshd with generated keys
(host key pinned), real ``ramp-test`` runs of the iris kit from this
environment, the real dispatcher and database. Fakes, named in
``aws_fixtures``: SLOW BOOT, SPOT NOTICE (IMDSv2) and SPOT SHORTAGE, for what
moto cannot simulate. Every test ends by asserting no instance is left running.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from aws_fixtures import require_aws_modules

require_aws_modules()

from aws_fixtures import (  # noqa: E402
    ACCESS_KEY,
    AMI_NAME,
    EVENT,
    KEY_NAME,
    REGION,
    SECRET,
    SECURITY_GROUP,
    AwsEnv,
    Ec2Proxy,
    Sshd,
    aws_env,  # noqa: F401  (fixtures)
    bastion,  # noqa: F401
    ec2_proxy,  # noqa: F401
    event_yaml,
    fake_spot_capacity_shortage,
    imds,  # noqa: F401
    moto_ec2,  # noqa: F401
    network,  # noqa: F401
    outcome_ok,
    sleeping_good,
    sshd,  # noqa: F401
)
from kit import GOOD, slow_source  # noqa: E402

from ramp_dispatcher.config import (
    ConfigError,
    load_event_config,
    server_config_for_url,
)  # noqa: E402
from ramp_dispatcher.workers import make_worker  # noqa: E402
from ramp_dispatcher.workers.aws.config import AWSConfig  # noqa: E402
from ramp_dispatcher.workers.aws.worker import AWSWorker  # noqa: E402
from ramp_dispatcher.workers.aws.network import host_keys_from_console  # noqa: E402
from ramp_dispatcher.workers.aws.ssh import known_hosts_fingerprints  # noqa: E402
from ramp_dispatcher.workers.base import FailureClass  # noqa: E402


# ---------------------------------------------------------------- config
def test_config_is_read_and_validated(tmp_path: Path, sshd: Sshd, caplog) -> None:  # noqa: F811
    server = server_config_for_url(f"sqlite:///{tmp_path / 'db.sqlite'}")
    path = tmp_path / "config.yml"
    key = tmp_path / "worker.pem"
    key.write_bytes(sshd.client_key.read_bytes())
    key.chmod(0o600)
    worker = {
        "access_key_id": ACCESS_KEY,
        "secret_access_key": SECRET,
        "region_name": REGION,
        "ami_image_name": "ramp-iris-*",
        "ami_user_name": "ubuntu",
        "instance_type": "t3.micro",
        "key_name": KEY_NAME,
        "security_group": SECURITY_GROUP,
        "key_path": "worker.pem",  # relative: next to the config file
        "remote_ramp_kit_folder": "/home/ubuntu/ramp-kits/iris",
        "local_predictions_folder": "downloads/predictions",
        "local_log_folder": "downloads/logs",
        "memory_profiling": True,
        "use_spot_instance": True,
        "ami_owners": ["self", "123456789012"],
        "unknown_setting": 1,
    }
    path.write_text(event_yaml(worker))
    with caplog.at_level(logging.WARNING):
        config = load_event_config(path, server).worker
    assert "worker.unknown_setting" in caplog.text
    assert isinstance(config, AWSConfig)
    assert config.key_path == key and config.local_log_folder == tmp_path / "downloads" / "logs"
    assert config.ami_owners == ("self", "123456789012") and config.use_spot_instance
    assert (config.timeout, config.ssh_port, config.boot_timeout) == (7200.0, 22, 600.0)
    assert config.verify_scores is True and "worker.verify_scores" not in caplog.text
    assert SECRET not in repr(config) and ACCESS_KEY not in repr(config)
    with pytest.raises(ValueError, match="event_name"):
        make_worker("aws", config)
    assert isinstance(make_worker("aws", config, event_name=EVENT), AWSWorker)

    def error(**changes: Any) -> str:
        path.write_text(event_yaml({**worker, **changes}))
        with pytest.raises(ConfigError) as info:
            load_event_config(path, server)
        return str(info.value)

    key.chmod(0o640)
    message = error()
    assert str(path) in message and "worker.key_path" in message and "chmod 600" in message
    key.chmod(0o600)
    assert "worker.key_path" in error(key_path="missing.pem")
    message = error(ami_image_name=None)
    assert str(path) in message and "worker.ami_image_name" in message and "required" in message
    assert "worker.timeout" in error(timeout=0)
    assert "worker.remote_ramp_kit_folder" in error(remote_ramp_kit_folder="ramp-kits/iris")
    assert "worker.security_group" in error(security_group=None)
    assert "worker.profile_name" in error(profile_name="default")
    assert "worker.deployment_id" in error(deployment_id="prod copy")
    assert "key 'worker.verify_scores' must be true or false" in error(verify_scores="maybe")
    path.write_text(event_yaml({**worker, "verify_scores": False}))
    assert load_event_config(path, server).worker.verify_scores is False
    message = error(secret_access_key=[SECRET])
    assert "worker.secret_access_key" in message and SECRET not in message
    # Without keys, boto3's default credential chain (or profile_name) is used.
    path.write_text(event_yaml({k: v for k, v in worker.items() if "access" not in k}))
    assert load_event_config(path, server).worker.access_key_id is None


def test_example_config_is_valid(tmp_path: Path, sshd: Sshd) -> None:  # noqa: F811
    import yaml

    example = Path(__file__).parents[1] / "deploy" / "aws-event-config.yml"
    data = yaml.safe_load(example.read_text())
    assert data["worker"]["worker_type"] == "aws"
    key = tmp_path / "key.pem"
    key.write_bytes(sshd.client_key.read_bytes())
    key.chmod(0o600)
    data["worker"]["key_path"] = str(key)
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(data))
    config = load_event_config(path, server_config_for_url(f"sqlite:///{tmp_path / 'x.db'}"))
    assert isinstance(config.worker, AWSConfig)


def test_host_keys_come_only_from_cloud_init_blocks(sshd: Sshd) -> None:  # noqa: F811
    pub = (sshd.host_key.parent / "ssh_host_ed25519_key.pub").read_text().split()
    other = "SHA256:" + "B" * 43
    console = textwrap.dedent(f"""\
        [  OK  ] Started OpenBSD Secure Shell server.
        SHA256:{"C" * 43} printed outside the blocks is not trusted
        -----BEGIN SSH HOST KEY FINGERPRINTS-----
        256 {other} root@ip-10-0-0-1 (ECDSA)
        -----END SSH HOST KEY FINGERPRINTS-----
        -----BEGIN SSH HOST KEY KEYS-----
        {pub[0]} {pub[1]} root@ip-10-0-0-1
        -----END SSH HOST KEY KEYS-----
        """)
    assert host_keys_from_console(console) == {other, sshd.host_fingerprint}
    assert host_keys_from_console("Linux version 2.6.16-xenU") == frozenset()
    # known_hosts_file: keys baked into the image, whatever the host name.
    known = sshd.host_key.parent / "known_hosts"
    known.write_text(f"# image keys\n* {pub[0]} {pub[1]}\n{pub[0]} {pub[1]} bare-key-line\n")
    assert known_hosts_fingerprints(known) == {sshd.host_fingerprint}


# ------------------------------------------------------------- lifecycle
def test_full_lifecycle_through_the_dispatcher(
    empty_db_url: str, tmp_path: Path, aws_env: AwsEnv
) -> None:
    from deployment import GOOD as DEMO_GOOD
    from deployment import RAISES as DEMO_RAISES
    from deployment import Deployment
    from rescoring import expected_valid_scores, folds_reader, run_message, stored_valid_scores
    from sandbox_attacks import forging_estimator

    from ramp_dispatcher.demo import write_iris_kit
    from ramp_dispatcher.dispatcher import Dispatcher

    # forger: a weak model that forges its scores in the sandbox (re-scored on the instance)
    dep = Deployment(tmp_path / "deploy", empty_db_url,
                     {"good": DEMO_GOOD, "raises": DEMO_RAISES, "forger": forging_estimator()})  # fmt: skip
    # The image holds the same kit as the server (the demo's estimator workflow).
    image_kit = tmp_path / "image-kit"
    write_iris_kit(image_kit, image_kit)
    settings = aws_env.settings(remote_ramp_kit_folder=str(image_kit), remote_python_env=sys.prefix)
    event_path = dep.event_path.with_name("aws-config.yml")
    event_path.write_text(event_yaml(settings, event="iris_demo") + textwrap.dedent("""\
            dispatcher:
              n_workers: 2
              n_threads: 1
              hunger_policy: exit
              poll_interval: 0.5
              time_between_collection: 0.5
              retry_delay: 0
            """))
    config = load_event_config(event_path, dep.server)
    worker = AWSWorker(config.worker, config.ramp.event_name, network=aws_env.network,
                       cv_folds=folds_reader(dep.engine))  # fmt: skip
    aws_env.workers.append(worker)
    d = Dispatcher(dep.engine, config, worker)
    d.start()
    try:
        assert d.stopped.wait(120), "the dispatcher did not finish"
    finally:
        d.stop()

    s = dep.summaries()
    good, raises = s["good"], s["raises"]
    assert good.state == "scored", good.error_msg
    assert good.error_msg == "" and good.max_ram and good.max_ram > 10
    assert good.scores["acc"][0] is not None and good.train_time and good.train_time > 0
    kept = config.ramp.predictions_dir / f"submission_{good.id:09d}"
    assert (kept / "bagged_scores.csv").is_file()
    assert (config.ramp.logs_dir / f"submission_{good.id:09d}" / "log").stat().st_size > 0
    # The participant's failure: the traceback reached error_msg from the
    # downloaded fold error.txt, and the log came back too.
    assert raises.state == "training_error"
    assert "refuses to learn" in raises.error_msg
    raises_log = config.ramp.logs_dir / f"submission_{raises.id:09d}" / "log"
    assert "refuses to learn" in raises_log.read_text()
    # The forger's scores: recomputed on the instance from its saved predictions.
    forger = s["forger"]
    assert forger.state == "scored", forger.error_msg
    kept = config.ramp.predictions_dir / f"submission_{forger.id:09d}"
    expected = expected_valid_scores(dep.engine, config.ramp.kit_dir, config.ramp.data_dir, kept, "acc")
    assert max(expected) < 0.5  # a constant guess
    assert stored_valid_scores(dep.engine, forger.id, "acc") == pytest.approx(expected)
    message = run_message(dep.engine, forger.id)
    assert message.startswith("scores recomputed outside the sandbox differ"), message
    assert "bagged" in message and "reported 1" in message
    assert run_message(dep.engine, good.id) == ""  # an honest run's are its own
    # Staging folders are emptied once their content is handed over.
    assert not any((aws_env.tmp / "downloads").rglob("*.csv"))
    assert not any((aws_env.tmp / "downloads").rglob("*.json"))
    ours = [
        i
        for i in aws_env.moto.instances()
        if {"Key": "ramp-dispatcher:event", "Value": "iris_demo"} in i["Tags"]
    ]
    assert len(ours) == 3 and all(i["State"]["Name"] == "terminated" for i in ours)
    aws_env.assert_no_instance_running()


def test_parallel_boots_do_not_block_start(aws_env: AwsEnv) -> None:
    # SLOW BOOT fake. start() takes milliseconds; its bound is half the boot
    # (not tighter: moto's in-process server competes for the GIL under load).
    aws_env.network.boot_delay = 4.0
    worker = aws_env.worker()
    wakes: list[int] = []
    runs = []
    for sid in (11, 12, 13):
        request = aws_env.request(GOOD, submission_id=sid)
        t0 = time.monotonic()
        handle = worker.start(request, lambda: wakes.append(1))
        assert time.monotonic() - t0 < aws_env.network.boot_delay / 2, "start() waited for the boot"
        assert json.loads(json.dumps(handle)) == handle  # stored as JSON by the dispatcher
        runs.append((request, handle))
    # The three instances boot at the same time, not one after another.
    aws_env.wait_for(lambda: len(aws_env.live_instances()) == 3, 10, "three instances at once")
    for request, handle in runs:
        outcome_ok(aws_env.wait(worker, request, handle), request)
    assert len(wakes) >= 3
    tags = [{t["Key"]: t["Value"] for t in i["Tags"]} for i in aws_env.moto.instances()]
    assert sorted(t["ramp-dispatcher:submission"] for t in tags) == ["11", "12", "13"]
    assert all(
        t["ramp-dispatcher:event"] == EVENT and t["ramp-dispatcher:attempt"] == "1" for t in tags
    )
    aws_env.assert_no_instance_running()


def test_spot_without_capacity_falls_back_to_on_demand(aws_env: AwsEnv) -> None:
    worker = aws_env.worker(aws_env.config(use_spot_instance=True))
    calls = fake_spot_capacity_shortage(worker.ec2_client)  # SPOT SHORTAGE fake
    request = aws_env.request(GOOD)
    handle = worker.start(request, lambda: None)
    outcome_ok(aws_env.wait(worker, request, handle), request)
    assert [c.get("InstanceMarketOptions.MarketType") for c in calls] == ["spot", None]
    assert calls[0]["ClientToken"] != calls[1]["ClientToken"]
    (instance,) = aws_env.moto.instances()
    assert instance.get("InstanceLifecycle") != "spot"
    aws_env.assert_no_instance_running()


def test_spot_interruption_notice_is_an_infrastructure_failure(aws_env: AwsEnv) -> None:
    worker = aws_env.worker(aws_env.config(use_spot_instance=True))
    request = aws_env.request(sleeping_good(60))
    handle = worker.start(request, lambda: None)
    aws_env.wait_for(lambda: aws_env.remote_pid(handle), 30, "ramp-test to start")
    for _ in range(3):  # checks ask the (fake) metadata service: no notice yet
        assert worker.check(request, handle) is None
        time.sleep(0.3)
    metadata = aws_env.network.imds
    assert ("PUT", "/latest/api/token") in metadata.requests
    assert ("GET", "/latest/meta-data/spot/instance-action") in metadata.requests
    metadata.interrupt()  # SPOT NOTICE fake: AWS announces the reclaim
    outcome = aws_env.wait(worker, request, handle)
    assert outcome.failure is FailureClass.INFRASTRUCTURE
    assert "interruption notice" in outcome.message
    (instance,) = aws_env.moto.instances()
    assert instance["InstanceLifecycle"] == "spot"
    assert not aws_env.group_alive(aws_env.remote_pid(handle))
    aws_env.assert_no_instance_running()


def test_upload_failure_is_infrastructure_and_a_retry_succeeds(aws_env: AwsEnv) -> None:
    worker = aws_env.worker()
    request = aws_env.request(GOOD)
    # The image's submissions folder cannot take this submission.
    blocker = aws_env.kit / "submissions" / request.submission_name
    blocker.write_text("a file where the submission's folder should go")
    outcome = aws_env.wait(worker, request, worker.start(request, lambda: None))
    assert outcome.failure is FailureClass.INFRASTRUCTURE
    assert "upload of the submission failed" in outcome.message
    aws_env.assert_no_instance_running()
    request.output_dir.mkdir(parents=True)  # what an earlier attempt may leave
    worker.cleanup(request, {})
    assert not request.output_dir.exists()

    blocker.unlink()  # what the dispatcher's retry meets: a new attempt, a new instance
    retry = dataclasses.replace(request, attempt=2)
    outcome_ok(aws_env.wait(worker, retry, worker.start(retry, lambda: None)), retry)
    assert len(aws_env.moto.instances()) == 2
    aws_env.assert_no_instance_running()


def test_ssh_lost_mid_run_reconnects(aws_env: AwsEnv) -> None:
    worker = aws_env.worker()
    request = aws_env.request(sleeping_good(1.5))
    handle = worker.start(request, lambda: None)
    aws_env.wait_for(lambda: aws_env.remote_pid(handle), 30, "ramp-test to start")
    assert worker.check(request, handle) is None
    aws_env.sshd.stop()  # every connection dies; the detached run goes on
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        t0 = time.monotonic()
        assert worker.check(request, handle) is None
        assert time.monotonic() - t0 < 0.2
        time.sleep(0.2)
    aws_env.sshd.start()
    outcome_ok(aws_env.wait(worker, request, handle), request)
    aws_env.assert_no_instance_running()


def test_instance_gone_mid_run_is_infrastructure(aws_env: AwsEnv) -> None:
    worker = aws_env.worker()
    request = aws_env.request(sleeping_good(60))
    handle = worker.start(request, lambda: None)
    aws_env.wait_for(lambda: aws_env.remote_pid(handle), 30, "ramp-test to start")
    (instance,) = aws_env.live_instances()
    aws_env.moto.client().terminate_instances(InstanceIds=[instance["InstanceId"]])
    aws_env.sshd.stop()  # as a real terminated instance: no more SSH
    outcome = aws_env.wait(worker, request, handle, timeout=30)
    aws_env.sshd.start()
    assert outcome.failure is FailureClass.INFRASTRUCTURE
    assert "terminated" in outcome.message
    aws_env.assert_no_instance_running()


def test_timeout_kills_the_remote_run_and_terminates(aws_env: AwsEnv) -> None:
    worker = aws_env.worker(aws_env.config(timeout=3.0))
    request = aws_env.request(slow_source(60))
    handle = worker.start(request, lambda: None)
    outcome = aws_env.wait(worker, request, handle, timeout=60)
    assert outcome.failure is FailureClass.TIMEOUT
    assert "time limit of 3 s" in outcome.message
    pgid = aws_env.remote_pid(handle)
    assert pgid and not aws_env.group_alive(pgid), "ramp-test survived its timeout"
    child = aws_env.ramp_test_group(handle)
    assert child and not aws_env.group_alive(child), "ramp-test survived its timeout"
    assert "[ramp-dispatcher] Training stopped" in request.log_path.read_text()
    assert outcome.log_path == request.log_path
    aws_env.assert_no_instance_running()


def forging_source() -> str:
    """A submission that defeats the instance-side time limit, as only a run
    without the sandbox can: it stops its supervisor (its parent), moves its
    run's ``started`` file into the future, deletes any ``exit`` file, then
    sleeps."""
    return (
        "import os\nimport pathlib\nimport signal\nimport time\n"
        + GOOD.replace(
            "        self.clf.fit(X, y)",
            "        os.kill(os.getppid(), signal.SIGSTOP)\n"
            "        for run in pathlib.Path('.ramp-dispatcher').glob('*'):\n"
            "            (run / 'started').write_text('9999999999\\n')\n"
            "            for name in ('exit', 'exit.tmp'):\n"
            "                (run / name).unlink(missing_ok=True)\n"
            "        time.sleep(600)\n"
            "        self.clf.fit(X, y)",
        )
    )


def test_daemon_deadline_stops_a_run_that_forges_its_files(aws_env: AwsEnv) -> None:
    # timeout: long enough for ramp-test to reach fit (and forge) first
    config = aws_env.config(timeout=10.0, boot_timeout=20.0, deadline_margin=5.0, sandbox="none")
    worker = aws_env.worker(config)
    request = aws_env.request(forging_source())
    handle = json.loads(json.dumps(worker.start(request, lambda: None)))  # as stored
    assert handle["deadline"] == pytest.approx(handle["created_at"] + 20 + 10 + 5)
    pgid = aws_env.wait_for(lambda: aws_env.remote_pid(handle), 30, "ramp-test to start")
    started = Path(handle["remote_run_dir"]) / "started"
    aws_env.wait_for(lambda: started.read_text().strip() == "9999999999", 30, "the forgery")
    outcome = aws_env.wait(worker, request, handle, timeout=120)
    assert time.time() >= handle["deadline"]  # not stopped by the instance's own check
    assert outcome.failure is FailureClass.TIMEOUT
    assert "time limit of 10 s" in outcome.message and "deadline" in outcome.message
    assert not aws_env.group_alive(pgid), "the run survived the deadline"
    child = aws_env.ramp_test_group(handle)
    assert child and not aws_env.group_alive(child), "ramp-test survived the deadline"
    assert "[ramp-dispatcher] Training stopped" in request.log_path.read_text()
    (instance,) = aws_env.moto.instances()
    assert instance["State"]["Name"] == "terminated"
    aws_env.assert_no_instance_running()


def test_run_past_its_deadline_before_starting_is_infrastructure(aws_env: AwsEnv) -> None:
    aws_env.network.boot_delay = 600  # SLOW BOOT fake: it never gets an address
    config = aws_env.config(timeout=1.0, boot_timeout=1.0, deadline_margin=1.0)
    first = aws_env.worker(config)
    request = aws_env.request(GOOD)
    handle = json.loads(json.dumps(first.start(request, lambda: None)))
    aws_env.wait_for(aws_env.live_instances, 10, "the launch")
    first.close()  # the daemon goes away before the instance ever answered
    aws_env.wait_for(lambda: time.time() > handle["deadline"], 10, "the deadline")
    second = aws_env.worker(config)  # restarted: the deadline comes with the handle
    outcome = aws_env.wait(second, request, handle, timeout=30)
    assert outcome.failure is FailureClass.INFRASTRUCTURE
    assert "did not start on its instance before its deadline" in outcome.message
    aws_env.assert_no_instance_running()


def test_restarted_daemon_reattaches_without_relaunching(aws_env: AwsEnv) -> None:
    probe = aws_env.tmp / "imports"
    probe.mkdir()
    # No sandbox: the probe writes outside the run's folders (a sandboxed run is
    # re-attached in test_a_run_taken_over_is_left_to_its_new_owner).
    config = aws_env.config(sandbox="none")
    first = aws_env.worker(config)
    request = aws_env.request(sleeping_good(1, probe_dir=probe))
    handle = json.loads(json.dumps(first.start(request, lambda: None)))  # as stored
    pid = aws_env.wait_for(lambda: aws_env.remote_pid(handle), 30, "ramp-test to start")
    assert first.check(request, handle) is None
    first.close()  # the daemon goes away; the instance and the run stay

    second = aws_env.worker(config)  # a new daemon, same handle from the database
    outcome_ok(aws_env.wait(second, request, handle), request)
    assert aws_env.remote_pid(handle) == pid  # the same run, collected
    assert len(list(probe.iterdir())) == 1  # ramp-test ran in one process only
    (instance,) = aws_env.moto.instances()  # never relaunched
    assert instance["State"]["Name"] == "terminated"
    aws_env.assert_no_instance_running()


def test_restarted_daemon_collects_a_run_that_finished_meanwhile(aws_env: AwsEnv) -> None:
    config = aws_env.config()
    first = aws_env.worker(config)
    request = aws_env.request(GOOD)
    handle = first.start(request, lambda: None)
    aws_env.wait_for(lambda: aws_env.remote_pid(handle), 30, "ramp-test to start")
    first.close()  # gone before ramp-test ends; nobody checks the run
    exit_file = Path(handle["remote_run_dir"]) / "exit"
    aws_env.wait_for(exit_file.exists, 60, "ramp-test to finish")
    second = aws_env.worker(config)
    outcome_ok(aws_env.wait(second, request, handle), request)
    (instance,) = aws_env.moto.instances()
    assert instance["State"]["Name"] == "terminated"
    aws_env.assert_no_instance_running()


def test_a_run_taken_over_is_left_to_its_new_owner(aws_env: AwsEnv, caplog) -> None:
    config = aws_env.config(reap_min_age=0)
    old = aws_env.worker(config)
    request = aws_env.request(sleeping_good(3))
    handle = json.loads(json.dumps(old.start(request, lambda: None)))  # as stored
    pid = aws_env.wait_for(lambda: aws_env.remote_pid(handle), 30, "ramp-test to start")
    assert old.check(request, handle) is None
    old_thread = old.runs[(request.submission_id, request.attempt)].thread
    (instance,) = aws_env.live_instances()
    # Another daemon adopted the run (the old one's lease lapsed) and re-attached.
    new = aws_env.worker(config)
    assert new.check(request, handle) is None
    # The old daemon learns it and drops the run: its worker forgets it.
    with caplog.at_level(logging.INFO):
        old.forget(request, handle)
        old_thread.join(30)
    assert not old_thread.is_alive() and "taken over by another daemon" in caplog.text
    assert (request.submission_id, request.attempt) not in old.runs  # no deadline checks either
    # Neither its cleanup nor its reaper (the run is active in the database) stop anything.
    old.cleanup(request, handle)
    old.reap({(request.submission_id, request.attempt)})
    assert old._reaper is not None
    old._reaper.join(10)
    assert _state(aws_env, instance["InstanceId"]) == "running"
    assert aws_env.group_alive(pid)
    outcome_ok(aws_env.wait(new, request, handle), request)  # the new owner collects it
    assert aws_env.remote_pid(handle) == pid  # the run that was started, never restarted
    old.cleanup(request, handle)  # late: the new owner's results stay
    assert (request.output_dir / "bagged_scores.csv").is_file()
    assert _state(aws_env, instance["InstanceId"]) == "terminated"  # by the new owner
    aws_env.assert_no_instance_running()


def test_reattach_to_a_terminated_instance_is_infrastructure(aws_env: AwsEnv) -> None:
    aws_env.network.boot_delay = 600  # SLOW BOOT fake: it never gets an address
    config = aws_env.config()
    first = aws_env.worker(config)
    request = aws_env.request(GOOD)
    handle = first.start(request, lambda: None)
    (instance,) = aws_env.wait_for(aws_env.live_instances, 10, "the launch")
    first.close()
    aws_env.moto.client().terminate_instances(InstanceIds=[instance["InstanceId"]])
    second = aws_env.worker(config)
    outcome = aws_env.wait(second, request, handle, timeout=30)
    assert outcome.failure is FailureClass.INFRASTRUCTURE
    assert f"{instance['InstanceId']} is terminated" in outcome.message
    aws_env.assert_no_instance_running()


def test_unknown_host_key_is_refused(aws_env: AwsEnv) -> None:
    # The instance "published" another key than the one its sshd presents.
    aws_env.network.published_keys = frozenset({"SHA256:" + "A" * 43})
    worker = aws_env.worker()
    request = aws_env.request(GOOD)
    outcome = aws_env.wait(worker, request, worker.start(request, lambda: None), timeout=30)
    assert outcome.failure is FailureClass.INFRASTRUCTURE
    assert (
        "refusing to connect" in outcome.message
        and aws_env.sshd.host_fingerprint in outcome.message
    )
    assert not (aws_env.kit / "submissions" / request.submission_name).exists()  # nothing sent
    aws_env.assert_no_instance_running()


def test_default_network_waits_for_console_host_keys(aws_env: AwsEnv) -> None:
    # No seam: the worker reads moto's console output, which publishes no
    # host key, so it never connects anywhere and gives up at boot_timeout.
    worker = AWSWorker(aws_env.config(boot_timeout=1.0), EVENT)
    aws_env.workers.append(worker)
    request = aws_env.request(GOOD)
    outcome = aws_env.wait(worker, request, worker.start(request, lambda: None), timeout=30)
    # A broken image, not an outage (issue 13): failed once, named, not retried.
    assert outcome.failure is FailureClass.CONFIGURATION
    assert (
        "not reachable over SSH within 1 s (its host keys are not published yet)" in outcome.message
    )
    assert "known_hosts_file" in outcome.message and "BEGIN SSH HOST KEY KEYS" in outcome.message
    aws_env.assert_no_instance_running()
    # The next submission launches nothing from that image: one instance at most.
    second = aws_env.request(GOOD, submission_id=2)
    outcome = aws_env.wait(worker, second, worker.start(second, lambda: None), timeout=30)
    assert outcome.failure is FailureClass.CONFIGURATION and "not launched" in outcome.message
    assert len(aws_env.moto.instances()) == 1


def _launch_tagged(
    aws_env: AwsEnv, event: str, submission: int, attempt: int, deployment: str | None
) -> str:
    """An instance as a worker of ``deployment`` tags it (None: no deployment tag)."""
    ec2 = aws_env.moto.client()
    image_id = ec2.describe_images(Owners=["self"])["Images"][0]["ImageId"]
    tags = {"ramp-dispatcher:event": event, "ramp-dispatcher:submission": str(submission),
            "ramp-dispatcher:attempt": str(attempt)}  # fmt: skip
    if deployment is not None:
        tags["ramp-dispatcher:deployment"] = deployment
    reply = ec2.run_instances(
        ImageId=image_id, MinCount=1, MaxCount=1, InstanceType="t3.micro",
        TagSpecifications=[{"ResourceType": "instance",
                            "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}],
    )  # fmt: skip
    return reply["Instances"][0]["InstanceId"]


def _state(aws_env: AwsEnv, instance_id: str) -> str:
    reply = aws_env.moto.client().describe_instances(InstanceIds=[instance_id])
    return reply["Reservations"][0]["Instances"][0]["State"]["Name"]


def test_reaper_terminates_instances_without_an_active_run(aws_env: AwsEnv) -> None:
    ec2 = aws_env.moto.client()
    careful = aws_env.worker()
    ours = careful.deployment_id

    def launch(event: str, submission: int, attempt: int) -> str:
        return _launch_tagged(aws_env, event, submission, attempt, ours)

    orphan = launch(EVENT, 99, 1)
    active = launch(EVENT, 98, 2)
    foreign = launch("another_event", 99, 1)

    def state(instance_id: str) -> str:
        return _state(aws_env, instance_id)

    # Young instances are spared: their run may be newer than the list of active runs.
    careful.reap(set())
    careful._reaper.join(10)
    assert state(orphan) == "running"

    reaper = aws_env.worker(aws_env.config(reap_min_age=0))
    reaper.reap({(98, 2)})
    reaper._reaper.join(10)
    assert state(orphan) == "terminated"
    assert state(active) == "running" and state(foreign) == "running"
    ec2.terminate_instances(InstanceIds=[active, foreign])
    aws_env.assert_no_instance_running()


def test_reaper_touches_only_its_own_deployment(aws_env: AwsEnv) -> None:
    """Production and a staging copy (same event name, same account and region)."""
    from ramp_dispatcher.workers.aws.worker import default_deployment_id

    prod_db = "postgresql+psycopg2://ramp:secret@db.prod:5432/ramp"
    staging_db = "postgresql://ramp:other@db.staging:5432/ramp"
    assert default_deployment_id(prod_db, EVENT) == default_deployment_id(
        "postgresql://ramp:changed@db.prod:5432/ramp", EVENT
    )  # stable: neither the driver nor the password counts
    assert default_deployment_id(prod_db, EVENT) != default_deployment_id(staging_db, EVENT)
    config = aws_env.config(reap_min_age=0)
    prod = make_worker("aws", config, event_name=EVENT, database=prod_db)
    staging = make_worker("aws", config, event_name=EVENT, database=staging_db)
    named = aws_env.worker(aws_env.config(reap_min_age=0, deployment_id="iris-staging-2"))
    assert isinstance(prod, AWSWorker) and isinstance(staging, AWSWorker)
    aws_env.workers += [prod, staging]
    assert named.deployment_id == "iris-staging-2"
    assert len({prod.deployment_id, staging.deployment_id, named.deployment_id}) == 3

    prod_orphan = _launch_tagged(aws_env, EVENT, 7, 1, prod.deployment_id)
    staging_orphan = _launch_tagged(aws_env, EVENT, 7, 1, staging.deployment_id)
    named_orphan = _launch_tagged(aws_env, EVENT, 7, 1, "iris-staging-2")
    untagged = _launch_tagged(aws_env, EVENT, 7, 1, None)  # e.g. launched by hand, or by ramp-engine
    staging.reap(set())
    staging._reaper.join(10)
    assert _state(aws_env, staging_orphan) == "terminated"
    for other in (prod_orphan, named_orphan, untagged):
        assert _state(aws_env, other) == "running"
    prod.reap(set())
    prod._reaper.join(10)
    assert _state(aws_env, prod_orphan) == "terminated"
    assert _state(aws_env, named_orphan) == "running" and _state(aws_env, untagged) == "running"
    aws_env.moto.client().terminate_instances(InstanceIds=[named_orphan, untagged])
    aws_env.assert_no_instance_running()


def test_instances_carry_the_deployment_tag_from_creation(aws_env: AwsEnv) -> None:
    worker = aws_env.worker(aws_env.config(deployment_id="iris-prod"))
    request = aws_env.request(GOOD)
    handle = worker.start(request, lambda: None)
    outcome_ok(aws_env.wait(worker, request, handle), request)
    (instance,) = aws_env.moto.instances()
    tags = {t["Key"]: t["Value"] for t in instance["Tags"]}
    assert tags["ramp-dispatcher:deployment"] == "iris-prod" == handle["deployment"]
    aws_env.assert_no_instance_running()


def test_cleanup_of_an_unknown_run_terminates_its_instance(aws_env: AwsEnv) -> None:
    # The dispatcher gives up on a run it re-attached in state "starting": it
    # calls cleanup with an empty handle; the instance is found by its tags.
    aws_env.network.boot_delay = 600  # SLOW BOOT fake
    config = aws_env.config()
    first = aws_env.worker(config)
    request = aws_env.request(GOOD)
    first.start(request, lambda: None)
    aws_env.wait_for(aws_env.live_instances, 10, "the launch")
    first.close()
    aws_env.worker(config).cleanup(request, {})
    aws_env.assert_no_instance_running()


def test_failures_never_leak_credentials(tmp_path: Path, aws_env: AwsEnv, caplog) -> None:
    from deployment import GOOD as DEMO_GOOD
    from deployment import Deployment

    from ramp_dispatcher.database.dispatcher_schema import runs
    from ramp_dispatcher.dispatcher import Dispatcher

    caplog.set_level(logging.DEBUG)
    dep = Deployment(
        tmp_path / "deploy", f"sqlite:///{tmp_path / 'ramp.sqlite'}", {"good": DEMO_GOOD}
    )
    event_path = dep.event_path.with_name("aws-config.yml")
    event_path.write_text(
        event_yaml(aws_env.settings(ami_image_name="no-such-image"), event="iris_demo")
        + "dispatcher:\n  hunger_policy: exit\n  poll_interval: 0.5\n"
        "  time_between_collection: 0.5\n  max_attempts: 1\n"
    )
    config = load_event_config(event_path, dep.server)
    worker = AWSWorker(config.worker, "iris_demo", network=aws_env.network)
    aws_env.workers.append(worker)
    d = Dispatcher(dep.engine, config, worker)
    d.start()
    try:
        assert d.stopped.wait(60)
    finally:
        d.stop()
    good = dep.summaries()["good"]
    assert good.state == "checking_error"
    assert "no available AMI named 'no-such-image'" in good.error_msg
    with dep.engine.connect() as conn:
        messages = conn.execute(select(runs.c.message)).scalars().all()
    for text in [caplog.text, good.error_msg, *messages]:
        assert SECRET not in text
    aws_env.assert_no_instance_running()


# ------------------------------------------------------- configuration errors
def test_validate_names_the_file_and_key_of_what_ec2_refuses(
    tmp_path: Path, aws_env: AwsEnv, ec2_proxy: Ec2Proxy  # noqa: F811
) -> None:
    server = server_config_for_url(f"sqlite:///{tmp_path / 'db.sqlite'}")
    path = tmp_path / "config.yml"

    def validate(**changes: Any) -> str | None:
        settings = aws_env.settings(endpoint_url=ec2_proxy.url, **changes)
        path.write_text(event_yaml({k: v for k, v in settings.items() if v is not None}))
        worker = AWSWorker(load_event_config(path, server).worker, EVENT)
        aws_env.workers.append(worker)
        try:
            worker.validate()
        except ConfigError as exc:
            return str(exc)
        return None

    assert validate() is None
    for key, value in (
        ("ami_image_name", "no-such-image"),
        ("key_name", "no-such-key"),
        ("security_group", "no-such-group"),
        ("subnet_id", "subnet-0123456789abcdef0"),
    ):
        message = validate(**{key: value})
        assert message and message.startswith(f"{path}: key 'worker.{key}'"), (key, message)
    # BAD CREDENTIALS stand-in: EC2 refuses the access key.
    ec2_proxy.rejected_access_key = ACCESS_KEY
    message = validate()
    assert message and f"{path}: key 'worker.access_key_id'" in message and "AuthFailure" in message
    assert SECRET not in message
    assert not aws_env.live_instances()  # nothing was launched to find out


def test_cli_run_exits_2_on_a_setting_ec2_refuses(
    tmp_path: Path, aws_env: AwsEnv, capsys
) -> None:
    from deployment import GOOD as DEMO_GOOD
    from deployment import Deployment

    from ramp_dispatcher.cli import main

    dep = Deployment(
        tmp_path / "deploy", f"sqlite:///{tmp_path / 'ramp.sqlite'}", {"good": DEMO_GOOD}
    )
    event_path = dep.event_path.with_name("aws-config.yml")
    event_path.write_text(
        event_yaml(aws_env.settings(key_name="no-such-key"), event="iris_demo")
    )
    code = main(["run", "--config", str(dep.server_path), "--event-config", str(event_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{event_path}: key 'worker.key_name'" in err and "InvalidKeyPair.NotFound" in err
    assert not aws_env.live_instances()


def test_a_wrong_setting_fails_the_run_once_not_retried(tmp_path: Path, aws_env: AwsEnv) -> None:
    from deployment import GOOD as DEMO_GOOD
    from deployment import Deployment

    from ramp_dispatcher.database.dispatcher_schema import runs
    from ramp_dispatcher.dispatcher import Dispatcher

    dep = Deployment(
        tmp_path / "deploy", f"sqlite:///{tmp_path / 'ramp.sqlite'}", {"good": DEMO_GOOD}
    )
    event_path = dep.event_path.with_name("aws-config.yml")
    event_path.write_text(
        event_yaml(aws_env.settings(ami_image_name="no-such-image"), event="iris_demo")
        + "dispatcher:\n  hunger_policy: exit\n  poll_interval: 0.5\n"
        "  time_between_collection: 0.5\n  max_attempts: 3\n  retry_delay: 0\n"
    )
    config = load_event_config(event_path, dep.server)
    worker = AWSWorker(config.worker, "iris_demo", network=aws_env.network)
    aws_env.workers.append(worker)
    d = Dispatcher(dep.engine, config, worker)  # no validate(): the image vanished later
    d.start()
    try:
        assert d.stopped.wait(60)
    finally:
        d.stop()
    good = dep.summaries()["good"]
    assert good.state == "checking_error"
    assert "worker.ami_image_name" in good.error_msg and "not because of your code" in good.error_msg
    with dep.engine.connect() as conn:
        classes = conn.execute(select(runs.c.failure_class)).scalars().all()
    assert classes == ["configuration"]  # one run: not retried as an outage
    assert not aws_env.moto.instances()


def test_throttled_api_calls_are_retried_with_backoff(
    aws_env: AwsEnv, ec2_proxy: Ec2Proxy  # noqa: F811
) -> None:
    # THROTTLING stand-in: EC2 answers RequestLimitExceeded a few times.
    ec2_proxy.throttle = {"DescribeImages": 2, "RunInstances": 2, "DescribeInstances": 2}
    worker = aws_env.worker(aws_env.config(endpoint_url=ec2_proxy.url))
    request = aws_env.request(GOOD)
    handle = worker.start(request, lambda: None)
    outcome_ok(aws_env.wait(worker, request, handle, timeout=120), request)
    assert sorted(ec2_proxy.throttled) == sorted(
        ["DescribeImages"] * 2 + ["RunInstances"] * 2 + ["DescribeInstances"] * 2
    )
    assert len(aws_env.moto.instances()) == 1  # retried inside the call: one instance
    aws_env.assert_no_instance_running()


# --------------------------------------------------------------- addressing
def test_ssh_address_public_or_private(aws_env: AwsEnv) -> None:
    from ramp_dispatcher.workers.aws.ec2 import Ec2, Ec2Error, Instance
    from ramp_dispatcher.workers.aws.network import Ec2InstanceNetwork

    ec2 = Ec2(aws_env.config())
    both = Instance("i-0a", "running", "203.0.113.7", "10.0.3.7", None, None)
    private_only = Instance("i-0b", "running", None, "10.0.3.8", None, None)
    public = Ec2InstanceNetwork(ec2, 22)  # the default
    private = Ec2InstanceNetwork(ec2, 2222, ssh_address="private")
    assert public.address(both) == ("203.0.113.7", 22)
    assert private.address(both) == ("10.0.3.7", 2222)
    assert private.address(private_only) == ("10.0.3.8", 2222)
    with pytest.raises(Ec2Error) as info:
        public.address(private_only)
    assert info.value.config_key == "ssh_address" and "ssh_address: private" in str(info.value)
    # The worker's default network follows the setting.
    worker = AWSWorker(aws_env.config(ssh_address="private"), EVENT)
    aws_env.workers.append(worker)
    assert worker.network.address(both) == ("10.0.3.7", 22)


def _known_hosts_of(server: Sshd, path: Path) -> Path:
    pub = (server.host_key.parent / "ssh_host_ed25519_key.pub").read_text().split()
    path.write_text(f"127.0.0.1 {pub[0]} {pub[1]}\n")
    return path


def test_ssh_through_a_bastion_checks_both_host_keys(
    aws_env: AwsEnv, bastion: Sshd  # noqa: F811
) -> None:
    jump = f"{bastion.user}@127.0.0.1:{bastion.port}"
    config = aws_env.config(
        ssh_proxy_jump=jump,
        ssh_proxy_key_path=bastion.client_key,  # the bastion's own key
        ssh_proxy_known_hosts_file=_known_hosts_of(bastion, aws_env.tmp / "bastion_known_hosts"),
    )
    assert config.proxy_jump == (bastion.user, "127.0.0.1", bastion.port)
    before = bastion.log.read_text()
    worker = aws_env.worker(config)
    request = aws_env.request(GOOD)
    outcome_ok(aws_env.wait(worker, request, worker.start(request, lambda: None)), request)
    seen = bastion.log.read_text()[len(before):]
    # Every SSH connection to the instance went through the bastion's channel.
    assert f"Accepted publickey for {bastion.user}" in seen
    assert f"target 127.0.0.1 port {aws_env.sshd.port}" in seen
    aws_env.assert_no_instance_running()

    # A bastion that is not the pinned host: refused before authenticating, once.
    wrong = aws_env.config(
        ssh_proxy_jump=jump,
        ssh_proxy_key_path=bastion.client_key,
        ssh_proxy_known_hosts_file=_known_hosts_of(aws_env.sshd, aws_env.tmp / "wrong_known"),
    )
    worker = aws_env.worker(wrong)
    request = aws_env.request(GOOD, submission_id=2)
    outcome = aws_env.wait(worker, request, worker.start(request, lambda: None), timeout=60)
    assert outcome.failure is FailureClass.CONFIGURATION
    assert bastion.host_fingerprint in outcome.message and "refusing to connect" in outcome.message
    assert "worker.ssh_proxy_known_hosts_file" in outcome.message
    assert not (aws_env.kit / "submissions" / request.submission_name).exists()
    aws_env.assert_no_instance_running()


def test_bastion_settings_are_checked_when_read(tmp_path: Path, sshd: Sshd) -> None:  # noqa: F811
    server = server_config_for_url(f"sqlite:///{tmp_path / 'db.sqlite'}")
    path = tmp_path / "config.yml"
    key = tmp_path / "worker.pem"
    key.write_bytes(sshd.client_key.read_bytes())
    key.chmod(0o600)
    known = _known_hosts_of(sshd, tmp_path / "known")
    worker = {
        "region_name": REGION, "ami_image_name": AMI_NAME, "ami_user_name": "ubuntu",
        "instance_type": "t3.micro", "key_name": KEY_NAME, "security_group": SECURITY_GROUP,
        "key_path": "worker.pem", "remote_ramp_kit_folder": "/home/ubuntu/ramp-kits/iris",
        "local_predictions_folder": "p", "local_log_folder": "l",
    }  # fmt: skip

    def error(**changes: Any) -> str:
        path.write_text(event_yaml({**worker, **changes}))
        with pytest.raises(ConfigError) as info:
            load_event_config(path, server)
        return str(info.value)

    assert "'worker.ssh_address' must be one of 'public', 'private'" in error(ssh_address="both")
    assert "worker.ssh_proxy_known_hosts_file" in error(ssh_proxy_jump="ec2-user@bastion")
    message = error(ssh_proxy_jump="bastion", ssh_proxy_known_hosts_file=str(known))
    assert "worker.ssh_proxy_jump" in message and "user@host" in message
    assert "worker.ssh_proxy_jump" in error(ssh_proxy_known_hosts_file=str(known))
    path.write_text(event_yaml({**worker, "ssh_address": "private",
                                 "ssh_proxy_jump": "ec2-user@bastion.example.org:2222",
                                 "ssh_proxy_known_hosts_file": "known"}))  # fmt: skip
    config = load_event_config(path, server).worker
    assert config.proxy_jump == ("ec2-user", "bastion.example.org", 2222)
    assert config.ssh_address == "private" and config.ssh_proxy_known_hosts_file == known


def test_client_token_makes_a_retried_launch_one_instance(
    aws_env: AwsEnv, ec2_proxy: Ec2Proxy  # noqa: F811
) -> None:
    from ramp_dispatcher.workers.aws.ec2 import client_token

    # LOST REPLY + CLIENT TOKEN stand-in: moto makes the instance, its reply is
    # lost, the call is retried; EC2 (the stand-in) answers a known token with
    # the first reply instead of launching again.
    ec2_proxy.lose_run_instances_replies = 1
    worker = aws_env.worker(aws_env.config(endpoint_url=ec2_proxy.url))
    request = aws_env.request(GOOD, submission_id=5)
    handle = worker.start(request, lambda: None)
    outcome_ok(aws_env.wait(worker, request, handle, timeout=120), request)
    expected = client_token(EVENT, 5, 1, handle["run"], "on-demand")
    assert ec2_proxy.run_instances_tokens == [expected, expected]  # the retry kept it
    assert ec2_proxy.lose_run_instances_replies == 0  # a reply was lost indeed
    (instance,) = aws_env.moto.instances()  # one instance, not two
    assert instance["State"]["Name"] == "terminated"
    aws_env.assert_no_instance_running()


def fake_console_without_host_keys(client: Any) -> None:
    """CONSOLE fake: the serial console of an image whose cloud-init finished
    without printing host keys (moto's console output never mentions cloud-init)."""
    import base64

    from botocore.awsrequest import AWSResponse

    text = "[   12.0] cloud-init[812]: Cloud-init v. 23.4 finished at Tue, 01 Dec 2026. Up 12 seconds\n"

    def before_call(params: dict[str, Any], **_: Any) -> Any:
        output = base64.b64encode(text.encode()).decode()  # as EC2 sends it
        reply = {"InstanceId": params["body"]["InstanceId"], "Output": output,
                 "ResponseMetadata": {"HTTPStatusCode": 200}}  # fmt: skip
        return AWSResponse("https://ec2.fake", 200, {}, None), reply

    client.meta.events.register("before-call.ec2.GetConsoleOutput", before_call)


def test_image_without_host_keys_fails_fast_naming_known_hosts_file(aws_env: AwsEnv) -> None:
    worker = AWSWorker(aws_env.config(boot_timeout=600.0), EVENT)  # the default network
    aws_env.workers.append(worker)
    fake_console_without_host_keys(worker.ec2_client)
    request = aws_env.request(GOOD)
    # Well before boot_timeout (600 s): cloud-init said it was done.
    outcome = aws_env.wait(worker, request, worker.start(request, lambda: None), timeout=60)
    assert outcome.failure is FailureClass.CONFIGURATION
    assert "cloud-init finished without printing SSH host keys" in outcome.message
    assert "known_hosts_file" in outcome.message and "AMI recipe" in outcome.message
    aws_env.assert_no_instance_running()


# ------------------------------------------------------------------ reload
def test_reload_applies_to_new_runs_and_names_what_needs_a_restart(
    aws_env: AwsEnv, caplog
) -> None:
    import subprocess

    # A second client key, authorized on the "image" like the first.
    new_key = aws_env.tmp / "new_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(new_key)], check=True)
    authorized = aws_env.sshd.root / "authorized_keys"
    before = authorized.read_text()
    authorized.write_text(before + (aws_env.tmp / "new_key.pub").read_text())
    new_fingerprint = subprocess.run(
        ["ssh-keygen", "-l", "-f", f"{new_key}.pub"], check=True, capture_output=True, text=True
    ).stdout.split()[1]
    try:
        worker = aws_env.worker()
        first = aws_env.request(sleeping_good(4), submission_id=1)
        first_handle = worker.start(first, lambda: None)
        aws_env.wait_for(lambda: aws_env.remote_pid(first_handle), 30, "the first run to start")
        log_start = len(aws_env.sshd.log.read_text())
        with caplog.at_level(logging.INFO):
            worker.reconfigure(
                aws_env.config(
                    key_path=new_key, instance_type="t3.large", timeout=60.0,
                    region_name="eu-west-1",  # where the instances are: needs a restart
                )  # fmt: skip
            )
        assert "worker.region_name cannot change without a restart" in caplog.text
        assert worker.config.region_name == REGION and worker.config.instance_type == "t3.large"
        second = aws_env.request(GOOD, submission_id=2)
        second_handle = worker.start(second, lambda: None)
        assert second_handle["timeout"] == 60.0 and first_handle["timeout"] == 120.0
        outcome_ok(aws_env.wait(worker, first, first_handle), first)  # kept its settings
        outcome_ok(aws_env.wait(worker, second, second_handle), second)
    finally:
        authorized.write_text(before)
    types = {
        {t["Key"]: t["Value"] for t in i["Tags"]}["ramp-dispatcher:submission"]: i["InstanceType"]
        for i in aws_env.moto.instances()
    }
    assert types == {"1": "t3.micro", "2": "t3.large"}
    assert new_fingerprint in aws_env.sshd.log.read_text()[log_start:]  # the new key was used
    aws_env.assert_no_instance_running()
