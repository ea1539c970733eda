"""pytest fixtures for testing code that uses vmexec, offline (``vmexec[testing]``).

Registered through the ``pytest11`` entry point, so installing ``vmexec[testing]`` makes
these fixtures available in any test suite with nothing to import:

``vmexec_cloud`` (session)
    a ``vmexec.testing.localcloud.LocalCloud``: moto's EC2 on 127.0.0.1 whose instances
    boot as fake VMs on this computer, each with its own sshd. One per test session
    (starting it builds the machines' package index: a few seconds).
``vmexec_cloud_options`` (function)
    ``VMExecutor`` keyword arguments for the cloud: ``provider="ec2"``, one
    ``c7i.large`` in the cloud's region, the cloud's endpoint, session, package index and
    address endpoint. Override with ``@pytest.mark.vmexec(...)``.
``vmexec_executor`` (function)
    a ``VMExecutor`` on the cloud with those options, shut down after the test, which
    then fails if any tagged resource (instance, security group, ...) is left.

Example::

    import pytest

    @pytest.mark.vmexec(max_workers=4)
    def test_my_pipeline(vmexec_executor):
        assert sorted(vmexec_executor.map(abs, [-2, 1])) == [1, 2]

The cloud needs OpenSSH's ``sshd`` and ``ssh-keygen`` (Debian/Ubuntu:
``apt-get install openssh-server``); without them the fixtures fail and say so.

Importing this module imports neither boto3 nor moto: a suite that does not use the
fixtures pays nothing. Must not import: the scheduler (the executor is public API).
"""

from __future__ import annotations

from typing import Any, Iterator

import pytest

__all__ = ["vmexec_cloud", "vmexec_cloud_options", "vmexec_executor"]

#: Options of ``vmexec_executor`` unless a ``vmexec`` marker says otherwise.
DEFAULTS: dict[str, Any] = {
    "max_workers": 2,
    "provider": "ec2",
    "instance_type": "c7i.large",
    "boot_timeout": 300,
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "vmexec(**options): VMExecutor options for the vmexec_executor fixture "
        "(e.g. max_workers=4, instance_type=['c7g.large', 'c7i.large'])")


@pytest.fixture(scope="session")
def vmexec_cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A local cloud for the whole session (see the module docstring)."""
    try:
        from vmexec.testing.localcloud import LocalCloud
        from vmexec.testing.sshd import sshd_available
    except ImportError as exc:
        pytest.fail(f"the vmexec_cloud fixture needs the testing extra: "
                    f"pip install 'vmexec[testing]' ({exc})", pytrace=False)
    missing = sshd_available()
    if missing is not None:
        pytest.fail(f"the vmexec_cloud fixture needs OpenSSH's sshd on this computer: "
                    f"{missing}", pytrace=False)
    # A short path: the cloud's control socket must fit in a Unix socket address.
    with LocalCloud() as cloud:
        yield cloud


@pytest.fixture
def vmexec_cloud_options(request: pytest.FixtureRequest, vmexec_cloud: Any) -> dict[str, Any]:
    """``VMExecutor`` options for ``vmexec_cloud``, with the ``vmexec`` marker's."""
    options = dict(DEFAULTS, regions=vmexec_cloud.regions[0])
    options.update(vmexec_cloud.executor_options())
    for marker in reversed(list(request.node.iter_markers("vmexec"))):
        options.update(marker.kwargs)
    return options


@pytest.fixture
def vmexec_executor(vmexec_cloud: Any, vmexec_cloud_options: dict[str, Any]
                    ) -> Iterator[Any]:
    """A ``VMExecutor`` on the local cloud; after the test it is shut down and nothing
    the fleet created may remain."""
    from vmexec import VMExecutor

    executor = VMExecutor(**vmexec_cloud_options)
    try:
        yield executor
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
    left = vmexec_cloud.tagged_resources()
    assert left == [], f"the fleet left resources behind: {left}"
    assert vmexec_cloud.offmachine_requests == [], \
        f"requests tried to leave this computer: {vmexec_cloud.offmachine_requests}"
