"""The aws worker's EC2 API calls.

:class:`Ec2` wraps the few calls the worker makes (find the image, launch,
find by tags, terminate, read the console). Errors become :class:`Ec2Error`,
whose message names the operation and AWS's error code and never holds
credentials. The tags the worker puts on its instances are named here too.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

import boto3
import botocore.config
import botocore.exceptions

if TYPE_CHECKING:
    from .config import AWSConfig

TAG_EVENT = "ramp-dispatcher:event"
TAG_SUBMISSION = "ramp-dispatcher:submission"
TAG_ATTEMPT = "ramp-dispatcher:attempt"
TAG_RUN = "ramp-dispatcher:run"  # the handle's run id: tells apart reused (submission, attempt)
TAG_DAEMON = "ramp-dispatcher:daemon"
#: which deployment (database + event) owns the instance: the reaper's scope
TAG_DEPLOYMENT = "ramp-dispatcher:deployment"

LIVE_STATES = ("pending", "running")
#: every state in which an instance may still cost money or come back
NOT_TERMINATED = ("pending", "running", "stopping", "stopped")
GONE_STATES = ("shutting-down", "terminated", "stopping", "stopped")

#: RunInstances errors after which a spot request is retried on demand
SPOT_FALLBACK_CODES = frozenset(
    {
        "InsufficientInstanceCapacity",
        "InsufficientCapacity",
        "InsufficientHostCapacity",
        "SpotMaxPriceTooLow",
        "MaxSpotInstanceCountExceeded",
        "UnfulfillableCapacity",
        "InsufficientFreeAddressesInSubnet",
    }
)

#: our own code for "no image matches ami_image_name" (DescribeImages succeeds)
NO_MATCHING_IMAGE = "ramp-dispatcher.NoMatchingImage"

#: our own code for "ssh_address: public but the instance has no public IP"
NO_PUBLIC_ADDRESS = "ramp-dispatcher.NoPublicAddress"

#: our own code for "cloud-init finished and printed no SSH host key"
NO_HOST_KEYS = "ramp-dispatcher.NoHostKeysOnConsole"

#: what a broken image lacks, said wherever it is missed
HOST_KEYS_HINT = (
    "the image must print its SSH host keys on its serial console, as cloud-init does "
    "by default (the '-----BEGIN SSH HOST KEY KEYS-----' block: see the AMI recipe in "
    "deploy/README.md), or the event config must pin them with known_hosts_file"
)

#: EC2 error codes that say a setting is wrong, with the setting: retrying
#: cannot help, the admin must fix the config (AWS's codes, as documented)
CONFIG_ERROR_KEYS: dict[str, str] = {
    NO_MATCHING_IMAGE: "ami_image_name",
    NO_PUBLIC_ADDRESS: "ssh_address",
    NO_HOST_KEYS: "known_hosts_file",
    "InvalidAMIID.NotFound": "ami_image_name",
    "InvalidAMIID.Malformed": "ami_image_name",
    "InvalidAMIID.Unavailable": "ami_image_name",
    "InvalidKeyPair.NotFound": "key_name",
    "InvalidGroup.NotFound": "security_group",
    "InvalidGroupId.NotFound": "security_group_ids",
    "InvalidGroupId.Malformed": "security_group_ids",
    "InvalidSubnetID.NotFound": "subnet_id",
    "InvalidSubnetID.Malformed": "subnet_id",
    "InvalidInstanceType": "instance_type",
    "AuthFailure": "access_key_id",
    "UnrecognizedClientException": "access_key_id",
    "InvalidClientTokenId": "access_key_id",
    "SignatureDoesNotMatch": "secret_access_key",
    "NoCredentialsError": "access_key_id",
    "UnauthorizedOperation": "access_key_id",  # the IAM policy lacks a permission
    "Blocked": "access_key_id",
    "OptInRequired": "region_name",
}


class Ec2Error(Exception):
    """An EC2 call failed. ``code`` is AWS's error code when there is one."""

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.code = code

    @property
    def config_key(self) -> str | None:
        """The ``worker`` setting to fix when the error is a configuration one."""
        return CONFIG_ERROR_KEYS.get(self.code or "")


@dataclass(frozen=True)
class Image:
    image_id: str
    name: str
    owner_id: str
    creation_date: str
    root_device_name: str | None


@dataclass(frozen=True)
class Instance:
    instance_id: str
    state: str
    public_ip: str | None
    private_ip: str | None
    launch_time: dt.datetime | None
    lifecycle: str | None  # "spot" for spot instances
    tags: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_api(cls, data: dict[str, Any]) -> Instance:
        return cls(
            instance_id=data["InstanceId"],
            state=data.get("State", {}).get("Name", "unknown"),
            public_ip=data.get("PublicIpAddress"),
            private_ip=data.get("PrivateIpAddress"),
            launch_time=data.get("LaunchTime"),
            lifecycle=data.get("InstanceLifecycle"),
            tags={t["Key"]: t["Value"] for t in data.get("Tags", [])},
        )

    def tag_int(self, key: str) -> int | None:
        value = self.tags.get(key, "")
        return int(value) if value.isdigit() else None

    @property
    def run_key(self) -> tuple[int | None, int | None]:
        return self.tag_int(TAG_SUBMISSION), self.tag_int(TAG_ATTEMPT)


def client_token(event: str, submission_id: int, attempt: int, run: str, market: str) -> str:
    """RunInstances' idempotency token: a retried call returns the same instance."""
    digest = hashlib.sha256(f"{event}\0{submission_id}\0{attempt}\0{run}\0{market}".encode())
    return "ramp-" + digest.hexdigest()[:48]  # EC2 allows 64 ASCII characters


#: added to RunInstances for a spot instance (one-time: never restarted by AWS)
SPOT_MARKET = {
    "InstanceMarketOptions": {
        "MarketType": "spot",
        "SpotOptions": {
            "SpotInstanceType": "one-time",
            "InstanceInterruptionBehavior": "terminate",
        },
    }
}


def launch_params(config: AWSConfig, image: Image, tags: dict[str, str]) -> dict[str, Any]:
    """RunInstances parameters for one run's instance (without market and token)."""
    tag_list = [{"Key": k, "Value": v[:255]} for k, v in tags.items()]
    params: dict[str, Any] = {
        "ImageId": image.image_id,
        "InstanceType": config.instance_type,
        "KeyName": config.key_name,
        "MinCount": 1,
        "MaxCount": 1,
        # At creation, so no instance ever exists untagged (the reaper finds all).
        "TagSpecifications": [
            {"ResourceType": "instance", "Tags": tag_list},
            {"ResourceType": "volume", "Tags": tag_list},
        ],
        # A shutdown from inside must not leave a stopped instance billed for its disk.
        "InstanceInitiatedShutdownBehavior": "terminate",
        # IMDSv2 only: what the spot check speaks, and safer for every process on it.
        "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled"},
    }
    if config.security_group_ids:
        params["SecurityGroupIds"] = list(config.security_group_ids)
    else:
        params["SecurityGroups"] = [config.security_group]
    if config.subnet_id:
        params["SubnetId"] = config.subnet_id
    profile = config.iam_instance_profile
    if profile:
        params["IamInstanceProfile"] = {"Arn" if profile.startswith("arn:") else "Name": profile}
    if config.root_volume_size_gb and image.root_device_name:
        params["BlockDeviceMappings"] = [
            {
                "DeviceName": image.root_device_name,
                "Ebs": {"VolumeSize": int(config.root_volume_size_gb), "DeleteOnTermination": True},
            }
        ]
    return params


def _error(operation: str, exc: Exception) -> Ec2Error:
    if isinstance(exc, botocore.exceptions.ClientError):
        err = exc.response.get("Error", {})
        code = err.get("Code") or "Unknown"
        return Ec2Error(f"EC2 {operation} failed: {code}: {err.get('Message', '')}".strip(), code)
    # NoCredentialsError, EndpointConnectionError, ...: their text names no secret
    code = "NoCredentialsError" if isinstance(exc, botocore.exceptions.NoCredentialsError) else None
    return Ec2Error(f"EC2 {operation} failed: {type(exc).__name__}: {exc}", code)


_API_ERRORS = (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError)


class Ec2:
    """The EC2 calls of one worker; safe to share between threads."""

    def __init__(self, config: AWSConfig):
        if config.access_key_id:
            session = boto3.session.Session(
                aws_access_key_id=config.access_key_id,
                aws_secret_access_key=config.secret_access_key,
                region_name=config.region_name,
            )
        else:  # a named profile, or the default chain (env, files, instance role)
            session = boto3.session.Session(
                profile_name=config.profile_name, region_name=config.region_name
            )
        self.client = session.client(
            "ec2",
            endpoint_url=config.endpoint_url,
            config=botocore.config.Config(
                retries={"mode": "standard", "max_attempts": 5},
                connect_timeout=10,
                read_timeout=60,
            ),
        )

    def find_image(self, name: str, owners: Iterable[str]) -> Image:
        """The newest available image called ``name`` (wildcards allowed) among ``owners``."""
        owners = list(owners)
        try:
            images = self.client.describe_images(
                Owners=owners,
                Filters=[
                    {"Name": "name", "Values": [name]},
                    {"Name": "state", "Values": ["available"]},
                ],
            )["Images"]
        except _API_ERRORS as exc:
            raise _error("DescribeImages", exc) from None
        if not images:
            raise Ec2Error(
                f"no available AMI named {name!r} owned by {', '.join(owners)}", NO_MATCHING_IMAGE
            )
        best = max(images, key=lambda i: i.get("CreationDate", ""))
        return Image(
            image_id=best["ImageId"],
            name=best.get("Name", name),
            owner_id=best.get("OwnerId", ""),
            creation_date=best.get("CreationDate", ""),
            root_device_name=best.get("RootDeviceName"),
        )

    def check_key_pair(self, name: str) -> None:
        try:
            self.client.describe_key_pairs(KeyNames=[name])
        except _API_ERRORS as exc:
            raise _error("DescribeKeyPairs", exc) from None

    def check_security_groups(self, names: Iterable[str], ids: Iterable[str]) -> None:
        kwargs: dict[str, Any] = {}
        if list(ids):
            kwargs["GroupIds"] = list(ids)
        else:
            kwargs["GroupNames"] = list(names)
        try:
            self.client.describe_security_groups(**kwargs)
        except _API_ERRORS as exc:
            raise _error("DescribeSecurityGroups", exc) from None

    def check_subnet(self, subnet_id: str) -> None:
        try:
            self.client.describe_subnets(SubnetIds=[subnet_id])
        except _API_ERRORS as exc:
            raise _error("DescribeSubnets", exc) from None

    def launch(self, params: dict[str, Any]) -> Instance:
        try:
            reply = self.client.run_instances(**params)
        except _API_ERRORS as exc:
            raise _error("RunInstances", exc) from None
        return Instance.from_api(reply["Instances"][0])

    def describe(self, instance_id: str) -> Instance | None:
        """The instance, or None when EC2 no longer knows it."""
        try:
            reply = self.client.describe_instances(InstanceIds=[instance_id])
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "InvalidInstanceID.NotFound":
                return None
            raise _error("DescribeInstances", exc) from None
        except botocore.exceptions.BotoCoreError as exc:
            raise _error("DescribeInstances", exc) from None
        for reservation in reply.get("Reservations", []):
            for data in reservation.get("Instances", []):
                return Instance.from_api(data)
        return None

    def find(self, tags: dict[str, str], states: Iterable[str] | None = None) -> list[Instance]:
        """Instances carrying all of ``tags``, oldest first."""
        filters = [{"Name": f"tag:{k}", "Values": [v]} for k, v in tags.items()]
        if states is not None:
            filters.append({"Name": "instance-state-name", "Values": list(states)})
        found: list[Instance] = []
        try:
            for page in self.client.get_paginator("describe_instances").paginate(Filters=filters):
                for reservation in page.get("Reservations", []):
                    found += [Instance.from_api(d) for d in reservation.get("Instances", [])]
        except _API_ERRORS as exc:
            raise _error("DescribeInstances", exc) from None
        epoch = dt.datetime.min.replace(tzinfo=dt.timezone.utc)
        return sorted(found, key=lambda i: (i.launch_time or epoch, i.instance_id))

    def terminate(self, instance_ids: list[str]) -> dict[str, str]:
        """Ask for termination; return each instance's new state."""
        if not instance_ids:
            return {}
        try:
            reply = self.client.terminate_instances(InstanceIds=instance_ids)
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "InvalidInstanceID.NotFound":
                return {i: "terminated" for i in instance_ids}  # nothing left to stop
            raise _error("TerminateInstances", exc) from None
        except botocore.exceptions.BotoCoreError as exc:
            raise _error("TerminateInstances", exc) from None
        return {
            t["InstanceId"]: t.get("CurrentState", {}).get("Name", "unknown")
            for t in reply.get("TerminatingInstances", [])
        }

    def wait_terminated(self, instance_ids: list[str], timeout: float, delay: float) -> None:
        delay = max(1, int(round(delay)))
        try:
            self.client.get_waiter("instance_terminated").wait(
                InstanceIds=instance_ids,
                WaiterConfig={"Delay": delay, "MaxAttempts": max(1, int(timeout // delay))},
            )
        except botocore.exceptions.WaiterError as exc:
            raise Ec2Error(
                f"instance(s) {', '.join(instance_ids)} not terminated after {timeout:g} s: {exc}"
            )
        except _API_ERRORS as exc:
            raise _error("DescribeInstances", exc) from None

    def console_output(self, instance_id: str) -> str:
        try:
            try:  # the live buffer (Nitro instances); older types only have the cached copy
                reply = self.client.get_console_output(InstanceId=instance_id, Latest=True)
            except botocore.exceptions.ClientError as exc:
                if exc.response.get("Error", {}).get("Code") != "UnsupportedOperation":
                    raise
                reply = self.client.get_console_output(InstanceId=instance_id)
        except _API_ERRORS as exc:
            raise _error("GetConsoleOutput", exc) from None
        return reply.get("Output") or ""
