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
import weakref
from types import CodeType, FunctionType, ModuleType
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


# function -> (what it captured when pickled, digest, bytes). Pickling a function by
# value costs ~10 µs, as much as the rest of submit(); reusing the bytes is safe as long
# as everything the function captures is still the very same object (checked with
# `is`, holding references so that a freed object's address cannot be mistaken for a
# new one). Rebinding a global — `N = 200` in a notebook — therefore re-pickles.
_function_cache: "weakref.WeakKeyDictionary[FunctionType, tuple[tuple[Any, ...], bytes, bytes]]" = \
    weakref.WeakKeyDictionary()
_code_names: "weakref.WeakKeyDictionary[CodeType, tuple[str, ...]]" = weakref.WeakKeyDictionary()
_MISSING = object()


def _global_names(code: CodeType) -> tuple[str, ...]:
    names = _code_names.get(code)
    if names is None:
        found = set(code.co_names)
        for const in code.co_consts:
            if isinstance(const, CodeType):
                found.update(_global_names(const))
        names = _code_names[code] = tuple(sorted(found))
    return names


def _captured(fn: FunctionType) -> tuple[Any, ...]:
    """Everything a by-value pickle of ``fn`` depends on, as object references."""
    globals_ = fn.__globals__
    cells = tuple(cell.cell_contents if _cell_filled(cell) else _MISSING
                  for cell in fn.__closure__ or ())
    return (fn.__code__, fn.__defaults__, fn.__kwdefaults__, cells,
            tuple(globals_.get(name, _MISSING) for name in _global_names(fn.__code__)),
            tuple(fn.__dict__.values()))


def _cell_filled(cell: Any) -> bool:
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True


def _same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, tuple) and isinstance(y, tuple) and type(x) is tuple:
            if not _same(x, y):
                return False
        elif x is not y:
            return False
    return True


def dumps_callable(fn: Callable[..., Any]) -> tuple[bytes, bytes]:
    """Pickle a callable; returns ``(digest, bytes)``. The digest keys the machine's cache.

    Raises:
        pickle.PicklingError: naming the callable and the reason.
    """
    register_user_modules()
    captured = None
    if type(fn) is FunctionType:
        captured = _captured(fn)
        hit = _function_cache.get(fn)
        if hit is not None and _same(hit[0], captured):
            return hit[1], hit[2]
    try:
        data = cloudpickle.dumps(fn)
    except Exception as exc:
        raise pickle.PicklingError(
            f"cannot send the callable {_describe(fn)} to a machine: {exc}. Define it at "
            "module level, or avoid capturing locks, sockets, open files or generators"
        ) from exc
    digest = hashlib.blake2b(data, digest_size=16).digest()
    if captured is not None:
        _function_cache[fn] = (captured, digest, data)  # type: ignore[index]
    return digest, data


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
