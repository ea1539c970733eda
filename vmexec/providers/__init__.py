"""Making and destroying machines. ``base`` is the interface; backends load lazily.

Every provider uses the same verbs: ``launch``, ``connect``, ``describe``, ``terminate``,
``sweep``. The registry below imports a backend only when it is asked for, so that
``import vmexec`` never pulls in boto3 or paramiko, and a missing optional dependency
becomes an error that says what to install.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from vmexec.errors import ProviderNotAvailable

if TYPE_CHECKING:
    from vmexec.providers.base import Provider

# name -> (module, class, pip extra that brings its dependencies)
_REGISTRY: dict[str, tuple[str, str, str]] = {
    "local": ("vmexec.providers.local", "LocalProvider", ""),
    "ssh": ("vmexec.providers.ssh", "SSHProvider", ""),
    "ec2": ("vmexec.providers.ec2", "EC2Provider", "aws"),
}

PROVIDER_NAMES = tuple(_REGISTRY)


def get_provider_class(name: str) -> type[Provider]:
    """Import and return the provider class registered under ``name``.

    Raises:
        ProviderNotAvailable: the name is unknown, or the backend's dependencies are missing.
    """
    try:
        module_name, class_name, extra = _REGISTRY[name]
    except KeyError:
        raise ProviderNotAvailable(
            f"unknown provider {name!r}: choose one of {', '.join(map(repr, _REGISTRY))} "
            "(argument provider= or environment variable VMEXEC_PROVIDER)"
        ) from None
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = f"pip install 'vmexec[{extra}]'" if extra else "reinstall vmexec"
        raise ProviderNotAvailable(
            f"provider {name!r} needs a package that is not installed ({exc.name}): {hint}"
        ) from exc
    cls: Any = getattr(module, class_name)
    return cls  # type: ignore[no-any-return]
