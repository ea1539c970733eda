"""Clients of a local cloud in other processes.

A ``boto3.Session`` and the ``address_for`` callable cannot cross a process boundary:
``LocalCloud.remote_options()`` gives plain data, and ``remote_executor_options`` (here,
in the client's process) rebuilds the executor options around the cloud's control
socket (``vmexec.testing.fakevm.ControlServer``), which answers ``CLIENT_REQUESTS``.
Killing such a client (even with SIGKILL) leaves the cloud and its machines alone.

Must not import: moto, paramiko, the scheduler, the executor or any provider.
"""

from __future__ import annotations

from typing import Any

import boto3

from vmexec.testing.control import control_request
from vmexec.testing.faults import region_of
from vmexec.testing.motoserver import FAKE_CREDENTIALS, POLL_OPERATIONS, for_endpoint, refused

__all__ = ["remote_executor_options", "CLIENT_REQUESTS"]

# What such a client asks the cloud over its control socket (LocalCloud._on_client_request).
CLIENT_REQUESTS = frozenset({"address", "refused", "launched"})


def remote_executor_options(remote: dict[str, Any]) -> dict[str, Any]:
    """In a client process: the executor options ``LocalCloud.remote_options()`` gave.

    The session has the cloud's fake credentials; its guard refuses any request not for
    the moto server and reports it to the cloud (``offmachine_requests``), and its
    launch and terminate calls make the cloud look at moto at once, in their region.
    ``address_for`` asks the cloud, which fixes addresses as for a client in its own
    process. Killing this process (even with SIGKILL) leaves the cloud untouched.

    Args:
        remote: what ``remote_options()`` returned.

    Returns:
        Options for ``VMExecutor(provider="ec2", ...)``.
    """
    control = str(remote["control"])
    options = dict(remote["options"])
    endpoint_url = str(options["endpoint_url"])
    session = boto3.Session(region_name=remote["region"], **FAKE_CREDENTIALS)

    def guard(request: Any, **_: Any) -> None:
        url = str(request.url)
        if not for_endpoint(url, endpoint_url):
            # Reported before refusing: the cloud's list must show it even when this
            # process dies before anyone reads its error.
            control_request(control, "refused", url)
            raise refused(url, endpoint_url)

    def launched(model: Any, context: dict[str, Any], **_: Any) -> None:
        if model.name in POLL_OPERATIONS:
            control_request(control, "launched", region_of(context))

    def address_for(record: Any) -> tuple[str, int]:
        instance_id = record if isinstance(record, str) else record.id
        host, port = control_request(control, "address", instance_id).split()
        return host, int(port)

    session.events.register("before-send", guard)
    session.events.register("after-call.ec2", launched)
    options.update(session=session, address_for=address_for)
    return options
