"""A named fleet adopts only what this computer launched (issue 12, item 3).

Tags are not proof of anything: whoever may create instances in the account can tag
one ``vmexec:fleet=vmx-<name>`` — even with the victim's owner tag — and an adopted
machine receives the user's tasks, data and environment. The provider records the ids
it launches in a ledger kept with the fleet's keys and adopts only those; it never adopts
a resource without an owner tag; and a reused security group keeps only this client's
way in. moto in-process: real boto3 calls, no account.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from vmexec.errors import ConfigError
from vmexec.providers.ec2.resources import TAG_FLEET, TAG_OWNER
from vmexec.providers.ec2.userdata import named_fleet_directory

ONE_REGION = dict(instance_type=["c7i.large"], regions=["us-east-1"])


def keep_one_warm(make_provider: Any, name: str, **options: Any) -> Any:
    first = make_provider(2, name=name, **ONE_REGION, **options)
    [record] = first.launch(2)
    record.state = "ready"
    first.terminate(None)  # a named fleet keeps its ready machines
    assert [r.id for r in first.teardown_summary.kept] == [record.id]
    return first, record


def test_an_instance_only_tagged_as_the_fleet_is_not_adopted(
        make_provider: Any, session: Any) -> None:
    first, mine = keep_one_warm(make_provider, "forge")
    ec2 = session.client("ec2", region_name="us-east-1")
    image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    # Someone else in the account plants a machine with the fleet's tags, owner included.
    [planted] = ec2.run_instances(
        ImageId=image, InstanceType="c7i.large", MinCount=1, MaxCount=1,
        TagSpecifications=[{"ResourceType": "instance", "Tags": [
            {"Key": TAG_FLEET, "Value": "vmx-forge"},
            {"Key": TAG_OWNER, "Value": first.owner}]}])["Instances"]
    second = make_provider(4, name="forge", **ONE_REGION)
    adopted = second.launch(2)
    assert [r.id for r in adopted] == [mine.id]
    more = second.launch(2)  # the rest is launched, never the planted one
    assert planted["InstanceId"] not in {r.id for r in more}
    # The ledger lives with the keys, private.
    ledger = Path(named_fleet_directory("vmx-forge"), "ledger.json")
    assert oct(ledger.stat().st_mode & 0o777) == "0o600"
    recorded = json.loads(ledger.read_text())["us-east-1"]["instances"]
    assert mine.id in recorded and planted["InstanceId"] not in recorded


def test_an_instance_without_an_owner_tag_is_never_adopted(
        make_provider: Any, session: Any) -> None:
    _, mine = keep_one_warm(make_provider, "ownerless")
    ec2 = session.client("ec2", region_name="us-east-1")
    ec2.delete_tags(Resources=[mine.id], Tags=[{"Key": TAG_OWNER}])
    second = make_provider(2, name="ownerless", **ONE_REGION)
    [record] = second.launch(2)
    assert record.id != mine.id


def test_a_reused_group_keeps_only_this_clients_address(
        make_provider: Any, session: Any) -> None:
    keep_one_warm(make_provider, "moved", ssh_cidr="203.0.113.7/32")
    second = make_provider(2, name="moved", **ONE_REGION, ssh_cidr="198.51.100.9/32")
    second.launch(2)
    ec2 = session.client("ec2", region_name="us-east-1")
    [group] = ec2.describe_security_groups(
        Filters=[{"Name": f"tag:{TAG_FLEET}", "Values": ["vmx-moved"]}])["SecurityGroups"]
    sources = [(rule["FromPort"], r["CidrIp"]) for rule in group["IpPermissions"]
               for r in rule.get("IpRanges", [])]
    assert sources == [(22, "198.51.100.9/32")]


def test_a_security_group_this_computer_did_not_create_is_refused(
        make_provider: Any, session: Any) -> None:
    ec2 = session.client("ec2", region_name="us-east-1")
    ec2.create_security_group(
        GroupName="vmexec-vmx-planted", Description="not vmexec's",
        TagSpecifications=[{"ResourceType": "security-group", "Tags": [
            {"Key": TAG_FLEET, "Value": "vmx-planted"}]}])
    with pytest.raises(ConfigError, match=r"did not create it.*vmexec cleanup --fleet "
                                          r"vmx-planted --all-owners --yes"):
        make_provider(2, name="planted", **ONE_REGION)


def test_a_ledger_others_can_read_is_refused(make_provider: Any) -> None:
    keep_one_warm(make_provider, "loose")
    ledger = Path(named_fleet_directory("vmx-loose"), "ledger.json")
    os.chmod(ledger, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        make_provider(2, name="loose", **ONE_REGION)
