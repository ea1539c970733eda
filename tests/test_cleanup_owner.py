"""``vmexec cleanup`` deletes only the caller's own resources, and exactly those it listed
(issue 12, item 2).

The owner is the AWS caller identity (STS), which the provider also writes into the
``vmexec:owner`` tag; a self-asserted ``user@host`` is someone else's as far as cleanup
is concerned. Runs against a moto server (real boto3 calls, no account).
"""

from __future__ import annotations

from typing import Any

import boto3
import pytest

from vmexec import cli
from vmexec.cli import resources as cli_resources
from vmexec.providers.ec2 import resources
from vmexec.providers.ec2.resources import TAG_FLEET, TAG_OWNER, caller_owner

REGION = "us-east-1"


def ec2(url: str) -> Any:
    return boto3.Session(region_name=REGION).client("ec2", region_name=REGION,
                                                     endpoint_url=url)


def me(url: str) -> str:
    return caller_owner(boto3.Session(region_name=REGION).client(
        "sts", region_name=REGION, endpoint_url=url))


def group(url: str, name: str, owner: str, fleet: str = "vmx-cleanup") -> str:
    """A vmexec-tagged security group (the cheapest resource to tag)."""
    answer = ec2(url).create_security_group(
        GroupName=name, Description="vmexec test",
        TagSpecifications=[{"ResourceType": "security-group", "Tags": [
            {"Key": TAG_FLEET, "Value": fleet}, {"Key": TAG_OWNER, "Value": owner}]}])
    return str(answer["GroupId"])


def groups(url: str) -> set[str]:
    found = ec2(url).describe_security_groups(
        Filters=[{"Name": "tag-key", "Values": [TAG_FLEET]}])["SecurityGroups"]
    return {g["GroupId"] for g in found}


def run(url: str, *args: str) -> int:
    return cli.main(["cleanup", "--endpoint-url", url, "--region", REGION, *args])


def test_owner_is_the_sts_identity(server_url: str) -> None:
    owner = me(server_url)
    assert owner.startswith("arn:aws:") and "@" not in owner


def test_cleanup_deletes_only_the_callers_resources_unless_all_owners(
        server_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    mine = group(server_url, "mine", me(server_url))
    theirs = group(server_url, "theirs", "arn:aws:iam::123456789012:user/someone-else")
    # What the old tag held: anyone can write any user@host, so it is not the caller's.
    claimed = group(server_url, "claimed", resources.owner())
    assert run(server_url, "--yes") == 0
    out = capsys.readouterr().out
    assert groups(server_url) == {theirs, claimed}
    assert mine in out and theirs not in out.split("left out")[0]
    assert "--all-owners" in out and "someone-else" in out

    assert run(server_url, "--all-owners", "--yes") == 0
    assert groups(server_url) == set()


def test_cleanup_deletes_exactly_what_it_listed(
        server_url: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    owner = me(server_url)
    listed = group(server_url, "listed", owner)
    created_after: list[str] = []
    find = cli_resources._find

    def find_then_another_fleet_starts(args: Any, clients: Any) -> Any:
        found = find(args, clients)
        # Between the listing and the deletion, another run of the same owner starts.
        created_after.append(group(server_url, "started-meanwhile", owner, "vmx-new"))
        return found

    monkeypatch.setattr(cli_resources, "_find", find_then_another_fleet_starts)
    assert run(server_url, "--yes") == 0
    out = capsys.readouterr().out
    assert listed in out and "deleted 1 security-group(s)" in out
    assert groups(server_url) == set(created_after)
