"""deploy/aws-iam-policy.json grants exactly the EC2 calls the aws worker makes.

The calls are read from the source (every ``self.client.<call>``, paginator
and waiter of workers/aws/ec2.py, the one module that talks to EC2), so a new
call without its permission, or a permission no call needs, fails here.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

ROOT = Path(__file__).parents[1]
AWS = ROOT / "ramp_dispatcher" / "workers" / "aws"
POLICY = ROOT / "deploy" / "aws-iam-policy.json"
#: botocore waiters, by the API call they poll
WAITER_CALLS = {"instance_terminated": "describe_instances", "instance_running": "describe_instances"}


def _camel(snake: str) -> str:
    return "".join(part.title() for part in snake.split("_"))


def ec2_calls(path: Path) -> set[str]:
    """API operations (``DescribeImages``, ...) called through ``self.client``."""
    calls: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        target = node.func.value
        if not (isinstance(target, ast.Attribute) and target.attr == "client"):
            continue
        name = node.func.attr
        if name in ("get_paginator", "get_waiter"):
            arg = node.args[0]
            assert isinstance(arg, ast.Constant), f"{path}: {name} with a computed name"
            name = WAITER_CALLS[arg.value] if name == "get_waiter" else arg.value
        calls.add(_camel(name))
    return calls


def policy_actions() -> dict[str, list[dict]]:
    granted: dict[str, list[dict]] = {}
    for statement in json.loads(POLICY.read_text())["Statement"]:
        assert statement["Effect"] == "Allow"
        actions = statement["Action"]
        for action in [actions] if isinstance(actions, str) else actions:
            granted.setdefault(action, []).append(statement)
    return granted


def test_the_policy_grants_exactly_the_calls_the_code_makes() -> None:
    calls = ec2_calls(AWS / "ec2.py")
    assert {"RunInstances", "TerminateInstances", "DescribeInstances"} <= calls  # the walk works
    granted = policy_actions()
    ec2_granted = {a.split(":", 1)[1] for a in granted if a.startswith("ec2:")}
    # Tags are written by RunInstances' TagSpecifications: CreateTags, only at launch.
    assert "TagSpecifications" in (AWS / "ec2.py").read_text()
    needed = calls | {"CreateTags"}
    assert ec2_granted == needed, (
        f"missing: {sorted(needed - ec2_granted)}, not needed: {sorted(ec2_granted - needed)}"
    )
    (tags,) = granted["ec2:CreateTags"]
    assert tags["Condition"] == {"StringEquals": {"ec2:CreateAction": "RunInstances"}}
    # What can stop or read an instance is scoped to this deployment's tag.
    for action in ("ec2:TerminateInstances", "ec2:GetConsoleOutput"):
        (statement,) = granted[action]
        condition = statement["Condition"]["StringEquals"]
        assert "aws:ResourceTag/ramp-dispatcher:deployment" in condition
    # IamInstanceProfile is passed only with iam_instance_profile: PassRole, one role.
    assert "IamInstanceProfile" in (AWS / "ec2.py").read_text()
    (pass_role,) = granted["iam:PassRole"]
    assert pass_role["Resource"] != "*"
    assert set(granted) == {f"ec2:{a}" for a in ec2_granted} | {"iam:PassRole"}


def test_no_other_module_talks_to_ec2() -> None:
    for path in sorted(AWS.glob("*.py")):
        if path.name != "ec2.py":
            assert not ec2_calls(path), f"{path.name} calls EC2 directly: move it to ec2.py"
