"""Turning the user's callables and arguments into bytes, on the client.

Owns the rule for *what travels by value*: functions and classes from ``__main__`` and
from the user's own modules (anything not installed in site-packages or the standard
library) are pickled by value with cloudpickle, because the machine cannot import
them; installed packages travel by reference. vmexec itself always travels by
reference: the agent has it.

A failure here names the offending object, and fails only the task that carried it.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import sys
import sysconfig
import threading
from types import ModuleType
from typing import Any, Callable, Optional

import cloudpickle

_lock = threading.Lock()
_checked_modules: set[str] = set()
_registered_packages: set[str] = set()
_seen_module_count = -1


def _installed_roots() -> tuple[str, ...]:
    roots = set()
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        path = sysconfig.get_paths().get(key)
        if path:
            roots.add(os.path.realpath(path))
    for prefix in (sys.prefix, sys.base_prefix, sys.exec_prefix):
        roots.add(os.path.realpath(os.path.join(prefix, "lib")))
    try:
        import site

        for path in site.getsitepackages() + [site.getusersitepackages()]:
            roots.add(os.path.realpath(path))
    except (AttributeError, TypeError):  # virtualenv's old site.py lacks these
        pass
    return tuple(sorted(roots))


_INSTALLED_ROOTS = _installed_roots()


def is_user_module(module: ModuleType) -> bool:
    """True when ``module`` is the user's own code that a machine cannot import."""
    name = module.__name__
    if name == "__main__" or name.split(".")[0] in ("vmexec", "cloudpickle"):
        return False
    path = getattr(module, "__file__", None)
    if not path:
        return False  # builtin or namespace: importable by name everywhere or nowhere
    real = os.path.realpath(path)
    return not any(real.startswith(root + os.sep) for root in _INSTALLED_ROOTS)


def register_user_modules() -> None:
    """Mark every imported user module to be pickled by value (cheap when nothing changed)."""
    global _seen_module_count
    if len(sys.modules) == _seen_module_count:
        return
    with _lock:
        for name, module in list(sys.modules.items()):
            if name in _checked_modules or not isinstance(module, ModuleType):
                continue
            _checked_modules.add(name)
            top = name.split(".")[0]
            if top in _registered_packages or not is_user_module(module):
                continue
            # Registering the top-level package covers all its submodules.
            root = sys.modules.get(top, module)
            try:
                cloudpickle.register_pickle_by_value(root)
            except (ValueError, TypeError):  # not a real module object
                continue
            _registered_packages.add(top)
        _seen_module_count = len(sys.modules)


def _describe(obj: Any) -> str:
    text = repr(obj)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} (type {type(obj).__module__}.{type(obj).__qualname__})"


def dumps_callable(fn: Callable[..., Any]) -> tuple[bytes, bytes]:
    """Pickle a callable; returns ``(digest, bytes)``. The digest keys the machine's cache.

    Raises:
        pickle.PicklingError: naming the callable and the reason.
    """
    register_user_modules()
    try:
        data = cloudpickle.dumps(fn)
    except Exception as exc:
        raise pickle.PicklingError(
            f"cannot send the callable {_describe(fn)} to a machine: {exc}. Define it at "
            "module level, or avoid capturing locks, sockets, open files or generators"
        ) from exc
    return hashlib.blake2b(data, digest_size=16).digest(), data


def dumps_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    """Pickle one call's arguments.

    Raises:
        pickle.PicklingError: naming the argument that cannot be pickled.
    """
    try:
        return cloudpickle.dumps((args, kwargs))
    except Exception as exc:
        raise pickle.PicklingError(_which_argument(args, kwargs, exc)) from exc


def dumps_chunk(chunk: list[tuple[Any, ...]]) -> bytes:
    """Pickle the argument tuples of a ``map`` chunk (one work item, many calls)."""
    try:
        return cloudpickle.dumps(chunk)
    except Exception as exc:
        for args in chunk:
            try:
                cloudpickle.dumps(args)
            except Exception:
                raise pickle.PicklingError(_which_argument(args, {}, exc)) from exc
        raise pickle.PicklingError(f"cannot pickle a map chunk: {exc}") from exc


def _which_argument(args: tuple[Any, ...], kwargs: dict[str, Any], exc: BaseException) -> str:
    culprit: Optional[str] = None
    for index, value in enumerate(args):
        try:
            cloudpickle.dumps(value)
        except Exception:
            culprit = f"positional argument {index}: {_describe(value)}"
            break
    else:
        for key, value in kwargs.items():
            try:
                cloudpickle.dumps(value)
            except Exception:
                culprit = f"keyword argument {key!r}: {_describe(value)}"
                break
    where = culprit or "the arguments"
    return f"cannot send {where} to a machine: {exc}"


def loads(data: bytes) -> Any:
    """Unpickle bytes made by a worker."""
    return pickle.loads(data)
