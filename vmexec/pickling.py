"""Turning the user's callables and arguments into bytes, on the client.

Owns the rule for *what travels by value*: functions and classes from ``__main__`` and
from the user's own modules (anything not installed in site-packages or the standard
library) are pickled by value with cloudpickle, because the machine cannot import
them; installed packages travel by reference. vmexec itself always travels by
reference: the agent has it.

Code that travels by value is pickled so that, on the worker, everything that came from
one client module shares one module namespace (``vmexec.agent.namespaces``): an
initializer's ``global MODEL`` is the tasks' ``MODEL``, as under ``ProcessPoolExecutor``.
For that the pickler numbers each global binding it sends: the number changes only when
the client rebinds the name to another object, and only a newer binding replaces what a
worker holds.

A failure here names the offending object, and fails only the task that carried it.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import operator
import os
import pickle
import sys
import sysconfig
import threading
import weakref
from collections import ChainMap
from types import CodeType, FunctionType, ModuleType
from typing import Any, Callable, Optional

import cloudpickle

from vmexec.agent import namespaces
from vmexec.protocol import PICKLE_PROTOCOL, is_plain

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


# (id of a module's globals, name) -> (the object last sent for that name, or a weak
# reference to it, and its number). The object is compared by identity, so it must not
# die while an entry names it (a new object could take its id and pass for the old
# binding): a weak reference that died no longer matches anything, and objects that
# cannot be weakly referenced (ints, strings, lists, dicts) are held. Numbers only
# grow: a worker that receives an older pickle after a newer one (functions are
# unpickled lazily) keeps the newer value.
_sent_bindings: dict[tuple[int, str], tuple[Optional[weakref.ref[Any]], Any, int]] = {}
_binding_numbers = itertools.count(1)
_binding_lock = threading.Lock()


def _held_is(weak: Optional[weakref.ref[Any]], strong: Any, value: Any) -> bool:
    if weak is None:
        return strong is value
    held = weak()
    return held is not None and held is value


def _hold(value: Any) -> tuple[Optional[weakref.ref[Any]], Any]:
    try:
        return weakref.ref(value), None
    except TypeError:
        return None, value


def _binding_numbers_of(namespace: dict[str, Any], values: dict[str, Any]) -> dict[str, int]:
    where = id(namespace)
    numbers = {}
    with _binding_lock:
        for name, value in values.items():
            sent = _sent_bindings.get((where, name))
            if sent is None or not _held_is(sent[0], sent[1], value):
                sent = _sent_bindings[(where, name)] = (*_hold(value), next(_binding_numbers))
            numbers[name] = sent[2]
    return numbers


def _module_key(namespace: dict[str, Any]) -> tuple[Any, int]:
    """Which client module a namespace is: its name, and the dict's identity."""
    return (namespace.get("__name__"), id(namespace))


def _cloudpickle_attribute(name: str) -> Any:
    for where in ("cloudpickle.cloudpickle", "cloudpickle.cloudpickle_fast"):
        module = sys.modules.get(where)
        if module is not None and hasattr(module, name):
            return getattr(module, name)
    return None


_CLASS_SETSTATE = _cloudpickle_attribute("_class_setstate")
_SUBIMPORT = _cloudpickle_attribute("subimport")
_MODULE_REDUCE = cloudpickle.Pickler.dispatch_table.get(ModuleType)


def _module_reduce(module: ModuleType) -> Any:
    """A user module by value becomes one shared module object on each worker."""
    assert _MODULE_REDUCE is not None
    reduced = _MODULE_REDUCE(module)
    if reduced[0] is _SUBIMPORT or len(reduced[1]) != 2:
        return reduced  # by reference: the worker imports it
    name, attributes = reduced[1]
    numbers = _binding_numbers_of(module.__dict__, attributes)
    return namespaces.make_module, (_module_key(module.__dict__), name, attributes, numbers)


_CODE_REDUCE = cloudpickle.Pickler.dispatch_table.get(CodeType)
_DYNAMIC_FILENAME = "<dynamic-code>"


def _code_reduce(code: CodeType) -> Any:
    """cloudpickle's code reduction, keeping the code's file name.

    cloudpickle (3.1) replaces it with "<dynamic-code>", so a remote traceback through
    the user's code would show neither the file nor the source line; with the name, the
    machine's traceback shows the file and line, and the source line where the file
    exists there, as ProcessPoolExecutor's does.
    """
    assert _CODE_REDUCE is not None
    reduced = _CODE_REDUCE(code)
    args = reduced[1]
    if _DYNAMIC_FILENAME in args:
        index = args.index(_DYNAMIC_FILENAME)
        reduced = (reduced[0], args[:index] + (code.co_filename,) + args[index + 1:],
                   *reduced[2:])
    return reduced


def _dispatch_overrides() -> dict[type, Any]:
    overrides: dict[type, Any] = {}
    if _MODULE_REDUCE is not None and _SUBIMPORT is not None:
        overrides[ModuleType] = _module_reduce
    if _CODE_REDUCE is not None:
        overrides[CodeType] = _code_reduce
    return overrides


class _Pickler(cloudpickle.Pickler):
    """cloudpickle, with by-value code bound to one shared namespace per module on the worker.

    Functions, classes and modules are reduced by cloudpickle; only their reconstructors
    are swapped for ``vmexec.agent.namespaces``'s, which the worker imports (vmexec itself
    always travels by reference). Where a cloudpickle version reduces differently, the
    object is left as cloudpickle made it.
    """

    dispatch_table = ChainMap(_dispatch_overrides(), cloudpickle.Pickler.dispatch_table)

    def _dynamic_function_reduce(self, func: FunctionType) -> Any:
        reduced = super()._dynamic_function_reduce(func)
        newargs, state = reduced[1], reduced[2]
        if len(newargs) != 5 or not isinstance(state, tuple) or len(state) != 2 \
                or "__globals__" not in state[1]:
            return reduced
        attributes, slots = state
        namespace = func.__globals__
        numbers = _binding_numbers_of(namespace, slots["__globals__"])
        return (namespaces.make_function, (_module_key(namespace), *newargs),
                (attributes, slots, numbers), None, None, namespaces.set_function_state)

    def reducer_override(self, obj: Any) -> Any:
        reduced = super().reducer_override(obj)
        if type(reduced) is tuple and len(reduced) == 6 and reduced[5] is _CLASS_SETSTATE \
                and _CLASS_SETSTATE is not None:
            reduced = reduced[:5] + (namespaces.set_class_state,)
        return reduced


def dumps(obj: Any) -> bytes:
    """Pickle ``obj`` as vmexec sends it to machines (cloudpickle; shared module state)."""
    with io.BytesIO() as file:
        _Pickler(file, protocol=cloudpickle.DEFAULT_PROTOCOL).dump(obj)
        return file.getvalue()


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
    """Everything a by-value pickle of ``fn`` depends on, as one flat tuple of object
    references: its code, defaults, closure cells, the globals its code names, and its
    ``__dict__`` values. The same code has the same cells and global names, so two
    tuples of the same function line up item by item."""
    globals_ = fn.__globals__
    return (fn.__code__, fn.__defaults__, fn.__kwdefaults__,
            *(cell.cell_contents if _cell_filled(cell) else _MISSING
              for cell in fn.__closure__ or ()),
            *(globals_.get(name, _MISSING) for name in _global_names(fn.__code__)),
            *fn.__dict__.values())


def _cell_filled(cell: Any) -> bool:
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True


def _same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    """Item by item the very same objects (``is``, in C: this runs on every submit)."""
    return len(a) == len(b) and all(map(operator.is_, a, b))


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
        data = dumps(fn)
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
    if is_plain(args) and (not kwargs or is_plain(kwargs)):
        # Builtin data: the standard pickler, ~7x cheaper than a cloudpickle Pickler.
        return pickle.dumps((args, kwargs), PICKLE_PROTOCOL)
    try:
        return dumps((args, kwargs))
    except Exception as exc:
        raise pickle.PicklingError(_which_argument(args, kwargs, exc)) from exc


def dumps_chunk(chunk: list[tuple[Any, ...]]) -> bytes:
    """Pickle the argument tuples of a ``map`` chunk (one work item, many calls)."""
    try:
        return dumps(chunk)
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
