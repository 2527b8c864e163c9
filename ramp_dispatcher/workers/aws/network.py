"""How the aws worker reaches an instance: its SSH address and trusted host keys.

:class:`InstanceNetwork` is the worker's one test seam: where to reach an
instance over SSH, which host keys it may present, and where its metadata
service answers. :class:`Ec2InstanceNetwork`, the default, uses the instance's
public or private IP (``ssh_address``) and the host keys cloud-init prints on the serial
console. Tests swap in an implementation that maps every instance to a local
sshd, because moto's addresses are not reachable and its console output
cannot know that sshd's key.
"""

from __future__ import annotations

import re
from typing import Protocol

from .ec2 import HOST_KEYS_HINT, NO_HOST_KEYS, NO_PUBLIC_ADDRESS, Ec2, Ec2Error, Instance
from .ssh import fingerprint_of_public_key

METADATA_URL = "http://169.254.169.254"
_FPR_BLOCK = re.compile(
    r"-----BEGIN SSH HOST KEY FINGERPRINTS-----(.*?)-----END SSH HOST KEY FINGERPRINTS-----", re.S
)
_KEYS_BLOCK = re.compile(
    r"-----BEGIN SSH HOST KEY KEYS-----(.*?)-----END SSH HOST KEY KEYS-----", re.S
)
#: cloud-init's last console line ("Cloud-init v. 23.4 finished at ...")
_CLOUD_INIT_DONE = re.compile(r"Cloud-init v\. \S+ finished at")
_FPR = re.compile(r"SHA256:[A-Za-z0-9+/]{43}")
_PUBKEY = re.compile(
    r"\b(?:ssh-[a-z0-9-]+|ecdsa-sha2-[a-z0-9-]+|sk-[a-z0-9@.-]+)\s+([A-Za-z0-9+/]+={0,3})"
)


def host_keys_from_console(text: str) -> frozenset[str]:
    """SHA256 fingerprints of the host keys cloud-init printed on the console.

    Both of cloud-init's blocks count: the fingerprints and the public keys
    (whose fingerprints we compute). Outside those blocks nothing is trusted.
    """
    found: set[str] = set()
    for block in _FPR_BLOCK.findall(text):
        found.update(_FPR.findall(block))
    for block in _KEYS_BLOCK.findall(text):
        for blob in _PUBKEY.findall(block):
            fp = fingerprint_of_public_key(blob)
            if fp:
                found.add(fp)
    return frozenset(found)


class InstanceNetwork(Protocol):
    """How the worker reaches an instance (the one seam tests replace)."""

    def address(self, instance: Instance) -> tuple[str, int] | None:
        """(host, port) of its sshd; None while it has no address yet."""

    def host_keys(self, instance: Instance) -> frozenset[str] | None:
        """Fingerprints its sshd may present; None while they are not known yet."""

    def metadata_url(self, instance: Instance) -> str:
        """Base URL of its metadata service, as seen from the instance."""


class Ec2InstanceNetwork:
    """The real thing: the instance's public or private IP (``ssh_address``)
    and console-published host keys.

    With ``trusted_keys`` (from the ``known_hosts_file`` setting) those keys
    are trusted instead: for images whose host keys are baked in.
    """

    def __init__(
        self,
        ec2: Ec2,
        ssh_port: int,
        trusted_keys: frozenset[str] | None = None,
        ssh_address: str = "public",
    ):
        self.ec2 = ec2
        self.ssh_port = ssh_port
        self.trusted_keys = trusted_keys
        self.ssh_address = ssh_address

    def address(self, instance: Instance) -> tuple[str, int] | None:
        if self.ssh_address == "private":
            host = instance.private_ip
        else:
            host = instance.public_ip
            if host is None and instance.state == "running" and instance.private_ip:
                # Running with a private address only: it never gets a public one.
                raise Ec2Error(
                    f"instance {instance.instance_id} has no public IP address (its subnet "
                    "does not assign one): use ssh_address: private from inside the VPC "
                    "or through a bastion (ssh_proxy_jump)",
                    NO_PUBLIC_ADDRESS,
                )
        return (host, self.ssh_port) if host else None

    def host_keys(self, instance: Instance) -> frozenset[str] | None:
        if self.trusted_keys is not None:
            return self.trusted_keys
        # Written by cloud-init once sshd's keys exist; empty until then.
        text = self.ec2.console_output(instance.instance_id)
        keys = host_keys_from_console(text)
        if keys:
            return keys
        if _CLOUD_INIT_DONE.search(text):  # it finished without printing them: never will
            raise Ec2Error(
                f"instance {instance.instance_id}: cloud-init finished without printing "
                f"SSH host keys on the console: {HOST_KEYS_HINT}",
                NO_HOST_KEYS,
            )
        return None

    def metadata_url(self, instance: Instance) -> str:
        return METADATA_URL
