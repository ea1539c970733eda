"""The ``ec2`` provider (AWS). Not available in this release.

Selecting it gives a clear error instead of a half-working fleet; the local and ssh
providers run the same executor today.
"""

from __future__ import annotations

from typing import Any

from vmexec.errors import ProviderNotAvailable


class EC2Provider:
    name = "ec2"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise ProviderNotAvailable(
            "provider 'ec2' is not available in this version of vmexec. Use "
            "provider='local' to run on this computer or provider='ssh', hosts=[...] for "
            "machines you already have (or set VMEXEC_PROVIDER=local)"
        )
