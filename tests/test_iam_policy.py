"""The IAM policy in docs/security.md is complete and least-privilege (issue 12, item 7).

The AWS actions vmexec needs are derived from the code: every call on a boto3 client
(``ec2.describe_instances(...)``), every paginator (``get_paginator("...")``), every
presigned URL (``presign("get_object", ...)``) and managed upload (``upload_file``), in
the modules that talk to AWS, mapped from the API operation to the IAM action(s) it is
authorised by. The documented policy must name exactly those actions, and keep its
scoping conditions.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any, Iterator

import botocore.session
from botocore import xform_name

ROOT = Path(__file__).resolve().parents[1]
SERVICES = {"ec2": "ec2", "ssm": "ssm", "s3": "s3", "sts": "sts", "pricing": "pricing",
            "service-quotas": "servicequotas"}
# The modules that create boto3 clients (the layer rule: boto3 lives there only).
# (The EC2 teardown's instance_terminated waiter calls DescribeInstances, listed anyway.)
AWS_MODULES = [*sorted((ROOT / "vmexec/providers/ec2").glob("*.py")),
               ROOT / "vmexec/environment/stage.py", *sorted((ROOT / "vmexec/cli").glob("*.py")),
               ROOT / "vmexec/guardrails/pricing.py"]
# API operation -> IAM actions, where they differ from "<prefix>:<operation>".
IAM_FOR = {
    "s3:HeadBucket": {"s3:ListBucket"},
    "s3:HeadObject": {"s3:GetObject"},
    "s3:ListObjectsV2": {"s3:ListBucket"},
    "s3:CopyObject": {"s3:GetObject", "s3:PutObject"},
    "s3:DeleteObjects": {"s3:DeleteObject"},
    "s3:PutBucketLifecycleConfiguration": {"s3:PutLifecycleConfiguration"},
    "s3:GetBucketLifecycleConfiguration": {"s3:GetLifecycleConfiguration"},
    "s3:PutPublicAccessBlock": {"s3:PutBucketPublicAccessBlock"},
    "s3:ListMultipartUploads": {"s3:ListBucketMultipartUploads"},
    # EC2 Fleet launches through RunInstances and needs its service-linked role.
    "ec2:CreateFleet": {"ec2:CreateFleet", "ec2:RunInstances", "iam:CreateServiceLinkedRole"},
    # Needs no permission (AWS: "No permissions are required to perform this operation").
    "sts:GetCallerIdentity": set(),
}
# boto3's managed transfers: several operations behind one method.
MANAGED = {"upload_file": {"s3:PutObject", "s3:AbortMultipartUpload"}}
# Module-level functions of vmexec named like operations (not client calls).
NOT_CLIENTS = {"resources", "client_network", "named", "fleet", "images"}


def operations() -> dict[str, set[str]]:
    """snake_case method name -> {"prefix:Operation"} over the services vmexec uses."""
    session = botocore.session.get_session()
    names: dict[str, set[str]] = {}
    for service, prefix in SERVICES.items():
        for operation in session.get_service_model(service).operation_names:
            names.setdefault(xform_name(operation), set()).add(f"{prefix}:{operation}")
    return names


def calls(path: Path, names: dict[str, set[str]]) -> Iterator[tuple[str, str]]:
    """(method name, where) for every AWS call in ``path``: a client method called or
    handed to a retry wrapper (``errors.call("CreateFleet", region, ec2.create_fleet)``),
    a paginator, a presigned URL."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                node.func.attr in ("get_paginator", "generate_presigned_url", "presign"):
            first = node.args[0] if node.args else None
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                yield first.value, f"{path.relative_to(ROOT)}:{node.lineno}"
            continue
        if not isinstance(node, ast.Attribute):
            continue
        if ast.unparse(node.value) in NOT_CLIENTS:
            continue
        if node.attr in names or node.attr in MANAGED:
            yield node.attr, f"{path.relative_to(ROOT)}:{node.lineno}"


def code_actions() -> dict[str, list[str]]:
    names = operations()
    needed: dict[str, list[str]] = {}
    for path in AWS_MODULES:
        for method, where in calls(path, names):
            if method in MANAGED:
                actions = MANAGED[method]
            else:
                candidates = names[method]
                assert len(candidates) == 1, f"{where}: {method} is ambiguous: {candidates}"
                [operation] = candidates
                actions = IAM_FOR.get(operation, {operation})
            for action in actions:
                needed.setdefault(action, []).append(where)
    return needed


def documented_policy() -> dict[str, Any]:
    text = (ROOT / "docs/security.md").read_text()
    section = text[text.index("## IAM permissions"):]
    block = re.search(r"```json\n(.*?)```", section, re.DOTALL)
    assert block, "docs/security.md: no JSON policy under 'IAM permissions'"
    return dict(json.loads(block.group(1)))


def statements() -> dict[str, dict[str, Any]]:
    return {s["Sid"]: s for s in documented_policy()["Statement"]}


def actions_of(statement: dict[str, Any]) -> set[str]:
    action = statement["Action"]
    return {action} if isinstance(action, str) else set(action)


def test_the_scan_finds_calls_in_every_layer() -> None:
    """A guard for the scan itself: calls known to exist are found."""
    needed = code_actions()
    for action in ("ec2:CreateFleet", "ec2:DescribeInstances", "s3:PutObject",
                   "s3:AbortMultipartUpload", "ssm:GetParameters", "pricing:GetProducts",
                   "servicequotas:GetServiceQuota", "ec2:RevokeSecurityGroupIngress"):
        assert action in needed, action


def test_documented_policy_names_exactly_the_actions_the_code_calls() -> None:
    needed = code_actions()
    documented: set[str] = set()
    for statement in documented_policy()["Statement"]:
        assert statement["Effect"] == "Allow"
        documented |= actions_of(statement)
    missing = {a: needed[a][:2] for a in sorted(set(needed) - documented)}
    unused = sorted(documented - set(needed))
    assert not missing, f"the code calls these, the policy lacks them: {missing}"
    assert not unused, f"the policy grants these, no code calls them: {unused}"


def test_tags_only_at_creation_except_the_client_mark() -> None:
    by_sid = statements()
    tagging = [s for s in by_sid.values() if "ec2:CreateTags" in actions_of(s)]
    for statement in tagging:
        condition = statement.get("Condition", {})
        at_creation = condition.get("StringEquals", {}).get("ec2:CreateAction")
        client_mark = condition.get("ForAllValues:StringEquals", {}).get("aws:TagKeys")
        assert at_creation or client_mark == ["vmexec:client"], statement["Sid"]
    [delete] = [s for s in by_sid.values() if "ec2:DeleteTags" in actions_of(s)]
    assert delete["Condition"]["ForAllValues:StringEquals"]["aws:TagKeys"] == \
        ["vmexec:client"]
    assert delete["Condition"]["Null"]["aws:TagKeys"] == "false"  # no empty key list


def test_changes_and_deletes_only_on_vmexec_resources() -> None:
    destructive = re.compile(r":(Delete|Terminate|Authorize|Revoke)")
    for statement in documented_policy()["Statement"]:
        ec2 = {a for a in actions_of(statement) if a.startswith("ec2:")}
        if any(destructive.search(a) for a in ec2) and "ec2:DeleteTags" not in ec2:
            assert statement["Condition"]["Null"]["aws:ResourceTag/vmexec:fleet"] == "false"


def test_staging_is_limited_to_the_accounts_own_buckets() -> None:
    staging = statements()["Staging"]
    assert all(r.startswith("arn:aws:s3:::vmexec-staging-") for r in staging["Resource"])
    assert staging["Condition"]["StringEquals"]["s3:ResourceAccount"] == \
        "${aws:PrincipalAccount}"
