"""The CLI's AWS helpers: sessions, EC2 clients per region, AWS errors in one phrase.

The CLI reaches AWS only through the EC2 provider's ``clients`` module (its one boto3
session and client factory, throttling retried there), imported when a command first
needs it, so ``vmexec --help`` works without the ``aws`` extra.
"""

from __future__ import annotations

import argparse
from typing import Any

from vmexec.errors import ConfigError, ProviderNotAvailable

__all__ = ["aws_session", "aws_errors", "brief", "ec2_clients"]


def aws_session(args: argparse.Namespace, required: bool = True) -> Any:
    """A ``boto3.Session`` for ``--profile``; None when not ``required`` and boto3 or
    credentials are missing.

    Raises:
        ProviderNotAvailable: boto3 is missing (``required``).
        ConfigError: no credentials (``required``).
    """
    try:
        from vmexec.providers.ec2 import clients
    except ImportError:
        if not required:
            return None
        raise ProviderNotAvailable("vmexec's AWS commands need boto3: "
                                   "pip install 'vmexec[aws]'") from None
    session = clients.session(args.profile)
    if session.get_credentials() is None:
        if not required:
            return None
        raise ConfigError("no AWS credentials found: configure them (`aws configure`, "
                          "AWS_PROFILE, --profile)")
    return session


def aws_errors() -> tuple[type[BaseException], ...]:
    from vmexec.providers.ec2.clients import AWS_ERRORS

    return AWS_ERRORS


def brief(exc: BaseException) -> str:
    """An AWS error in one short phrase: its code and the start of its message."""
    error = getattr(exc, "response", {}).get("Error", {}) if hasattr(exc, "response") else {}
    text = f"{error.get('Code')}: {error.get('Message', '')}" if error.get("Code") else str(exc)
    text = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return text if len(text) <= 100 else text[:97] + "..."


def ec2_clients(args: argparse.Namespace) -> dict[str, Any]:
    """Region -> EC2 client for ``--region`` (default: every enabled region).

    Raises:
        ConfigError: no credentials, or boto3 missing.
    """
    from vmexec.providers.ec2.clients import ClientFactory

    session = aws_session(args)
    home = session.region_name or "us-east-1"
    client = ClientFactory(session, args.endpoint_url).ec2

    regions = args.regions
    if not regions:
        from vmexec.providers.ec2.fleet import describe_regions

        regions = sorted(r for r, status in describe_regions(client(home)).items()
                         if status != "not-opted-in")
    return {region: client(region) for region in dict.fromkeys(regions)}
