"""The local cloud's API endpoint: moto on 127.0.0.1, and the guard that keeps every
AWS request on it.

Owns ``QuietMotoServer`` (moto's threaded server without a log line per request),
``reset_moto`` (moto's state is process-wide), the fake credentials every local cloud
uses, and the guard's verdict (``for_endpoint`` / ``refused``): a request whose URL is
not the moto server raises ``OffMachineRequestError`` before it is sent.

Imports moto and botocore (tests only). Must not import paramiko, the scheduler, the
executor or any provider.
"""

from __future__ import annotations

import urllib.request
from typing import Any

import botocore.exceptions
from moto.server import ThreadedMotoServer

__all__ = ["FAKE_CREDENTIALS", "OffMachineRequestError", "QuietMotoServer", "reset_moto",
           "for_endpoint", "refused", "POLL_OPERATIONS", "MOTO_ERRORS"]

#: The credentials every local cloud uses (moto accepts any).
FAKE_CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing",
                    "aws_session_token": "testing"}

#: Calls after which the cloud looks at moto at once: machines appear or go.
POLL_OPERATIONS = frozenset({"RunInstances", "CreateFleet", "TerminateInstances",
                             "StopInstances", "StartInstances", "RequestSpotInstances"})

#: What a call to moto may fail with while it is busy or going away.
MOTO_ERRORS = (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, OSError)


class OffMachineRequestError(RuntimeError):
    """A request was about to leave the local cloud (its URL is not the moto server)."""


class QuietMotoServer(ThreadedMotoServer):
    """moto's threaded server without a log line per request (they drown test logs)."""

    def _server_entry(self) -> None:
        from moto.server import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import WSGIRequestHandler, make_server

        class Quiet(WSGIRequestHandler):
            def log_request(self, *args: Any, **kwargs: Any) -> None:
                return

        app = DomainDispatcherApplication(create_backend_app)
        self._server = make_server(self._ip_address, self._port, app, True,
                                   request_handler=Quiet)
        self._server_ready_event.set()
        self._server.serve_forever()


def reset_moto(endpoint_url: str) -> None:
    """Empty moto's (process-wide) backends through its reset API."""
    request = urllib.request.Request(f"{endpoint_url}/moto-api/reset", method="POST")
    # The moto server is on 127.0.0.1: never through a proxy.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=30) as response:
        response.read()


def for_endpoint(url: str, endpoint_url: str) -> bool:
    """Whether ``url`` is a request to the moto server at ``endpoint_url``."""
    return url == endpoint_url or url.startswith(endpoint_url + "/")


def refused(url: str, endpoint_url: str) -> OffMachineRequestError:
    """The error for a request to ``url`` that is not for the moto server."""
    return OffMachineRequestError(
        f"refusing a request to {url}: in the local cloud every AWS call must go to "
        f"{endpoint_url} (pass endpoint_url= and session= to every client)")
