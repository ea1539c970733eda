"""The AWS clients of a fleet, and doing something in every region at once.

Owns:

* ``ClientFactory`` — the one place boto3 clients are made for the EC2 provider: one
  botocore ``Config`` (timeouts, connection pool, botocore's own retries kept to one
  retry of network hiccups), one client per service and region, made under a lock
  (boto3 sessions are not thread-safe; clients are).
* ``RetryingClient`` — what the factory hands out: a client whose API calls retry
  throttling (``RequestLimitExceeded`` and friends) with vmexec's jittered backoff
  (``vmexec.retry.throttling``: logged, injectable clock). This is the one place
  throttling is retried: the modules of this package call the API directly.
  (Not botocore's adaptive mode: errors injected by ``vmexec.testing.faults`` are
  answered before botocore's retry loop, and its sleeps cannot be faked.)
* ``in_every_region(fn, regions)`` — ``fn(region)`` for every region at once, with
  plain threads: teardown also runs from ``atexit``, after ``concurrent.futures``
  refuses new work.

Lives under ``providers/ec2`` (imports boto3). Must not import the scheduler, the
executor, or the other modules of this package.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Iterable, Optional, TypeVar

from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, InvalidRegionError

from vmexec import retry
from vmexec.errors import ConfigError

__all__ = ["AWS_ERRORS", "CONFIG", "ClientFactory", "RetryingClient", "retrying", "session",
           "in_every_region"]

T = TypeVar("T")

#: Every EC2/SSM/STS client of a fleet. botocore retries twice at most (network
#: hiccups); throttling beyond that goes to ``RetryingClient``, whose waits the logs show.
CONFIG = Config(retries={"mode": "standard", "total_max_attempts": 2},
                connect_timeout=10, read_timeout=120, max_pool_connections=50)


class RetryingClient:
    """A boto3 client whose API operations retry throttling (``vmexec.retry.throttling``).

    Everything else (``meta``, ``exceptions``, ``get_paginator``, ``get_waiter``) is the
    client's own. Errors other than throttling propagate at once; translating them is
    the caller's business (``errors.call`` / ``errors.translate``).
    """

    def __init__(self, client: Any) -> None:
        self._client = client

    @property
    def wrapped(self) -> Any:
        """The boto3 client itself."""
        return self._client

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        operation = self._client.meta.method_to_api_mapping.get(name)
        if operation is None:
            return attribute
        what = f"{operation} in {self._client.meta.region_name}"

        def call(**kwargs: Any) -> Any:
            return retry.throttling(what)(attribute, **kwargs)

        call.__name__ = name
        return call

    def __repr__(self) -> str:
        return f"<RetryingClient {self._client!r}>"


def retrying(client: Any) -> Any:
    """``client`` as a ``RetryingClient`` (unchanged if it is one already).

    For the functions of this package that the CLI also calls with clients of its own.
    """
    return client if isinstance(client, RetryingClient) else RetryingClient(client)


#: What an AWS call raises when it fails (an API error, or the SDK's own).
AWS_ERRORS: tuple[type[BaseException], ...] = (ClientError, BotoCoreError)


def session(profile: Optional[str] = None) -> Any:
    """A ``boto3.Session`` (of ``profile`` when given), for callers outside this package
    (the CLI) that must not import boto3 themselves."""
    import boto3

    return boto3.Session(profile_name=profile) if profile else boto3.Session()


class ClientFactory:
    """Clients of one boto3 session, per service and region, all alike.

    Args:
        session: the ``boto3.Session`` (its event handlers, e.g. fault injection in
            tests, are copied into each client when it is made).
        endpoint_url: AWS endpoint for every client (e.g. a moto server).
    """

    def __init__(self, session: Any, endpoint_url: Optional[str] = None) -> None:
        self.session = session
        self.endpoint_url = endpoint_url
        self._lock = threading.Lock()
        self._clients: dict[tuple[str, str], RetryingClient] = {}

    def client(self, service: str, region: str) -> Any:
        """The ``service`` client of ``region`` (made once).

        Raises:
            ConfigError: ``region`` is not a region name.
        """
        with self._lock:
            client = self._clients.get((service, region))
            if client is None:
                try:
                    made = self.session.client(service, region_name=region,
                                               endpoint_url=self.endpoint_url,
                                               config=CONFIG)
                except InvalidRegionError as exc:
                    raise ConfigError(f"regions: {exc}; use names like 'us-east-1'") from None
                client = self._clients[(service, region)] = RetryingClient(made)
            return client

    def ec2(self, region: str) -> Any:
        return self.client("ec2", region)

    def ssm(self, region: str) -> Any:
        return self.client("ssm", region)

    def sts(self, region: str) -> Any:
        return self.client("sts", region)


def in_every_region(fn: Callable[[str], T], regions: Iterable[str], *,
                    name: str = "vmexec-ec2") -> dict[str, T]:
    """``{region: fn(region)}``, every region at once, in the order of ``regions``.

    One plain thread per region (a single region runs in this thread), joined before
    returning: teardown runs from ``atexit`` too, where ``concurrent.futures`` refuses
    work; where even a thread cannot start any more, the region runs in this thread.

    Raises:
        Whatever ``fn`` raised, for the first region (in order) where it raised, once
        every region has finished: the others are not abandoned half-way.
    """
    names = list(dict.fromkeys(regions))
    results: dict[str, Any] = {}
    failures: dict[str, BaseException] = {}

    def run(region: str) -> None:
        try:
            results[region] = fn(region)
        except BaseException as exc:  # re-raised below, in the caller's thread
            failures[region] = exc

    if len(names) == 1:
        run(names[0])
    else:
        threads = []
        for region in names:
            thread = threading.Thread(target=run, args=(region,), daemon=True,
                                      name=f"{name}-{region}")
            try:
                thread.start()
            except RuntimeError:  # "can't create new thread at interpreter shutdown"
                run(region)
                continue
            threads.append(thread)
        for thread in threads:
            thread.join()
    for region in names:
        if region in failures:
            raise failures[region]
    return {region: results[region] for region in names}
