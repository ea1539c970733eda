"""One module namespace per user module in each worker process, shared by all its code.

Owns the worker's side of code that travels by value (``__main__`` scripts, notebooks,
the user's own modules that are not installed). Plain cloudpickle gives every unpickled
function a private copy of its module's globals, so what an initializer stores in a
global (``global MODEL; MODEL = load()``) is invisible to the tasks. Here every
function, class and module object that came by value from the same client module binds
to one namespace (the ``__dict__`` of one module object per client module), so module
state behaves as under ``ProcessPoolExecutor`` with the spawn context: the initializer
and every task of a worker process see and change the same globals.

Which value of a global wins when a function arrives carrying the client's value of a
name the worker already has: the client numbers each *binding* it sends (the number
changes only when the client rebinds the name to another object, see
``vmexec.pickling``). A binding newer than the one the worker last received replaces
the worker's value (a notebook re-running ``N = 200`` reaches the workers); an old one
does not (what the initializer or earlier tasks stored, or mutated in place, stays).

The client's pickler (``vmexec.pickling``) emits references to ``make_function``,
``set_function_state``, ``set_class_state`` and ``make_module``; nothing else calls them.

Imports only the standard library and cloudpickle: runs on a bare machine.
"""

from __future__ import annotations

import sys
import types
import weakref
from typing import Any, Hashable, Optional

import cloudpickle

__all__ = ["make_function", "set_function_state", "set_class_state", "make_module"]

# Client module identity (its name and the id of its globals on the client) -> the one
# module object standing for it in this process.
_modules: dict[Hashable, types.ModuleType] = {}
# id(namespace) -> {global name: number of the client binding it holds}.
_bindings: dict[int, dict[str, int]] = {}
# Classes that came by value and whose state was set once in this process: a class
# that arrives again (in the next task's pickle) keeps what the worker stored on it.
_classes_set_up: "weakref.WeakSet[type]" = weakref.WeakSet()


def _module_for(key: Hashable, name: Optional[str], attributes: dict[str, Any]
                ) -> types.ModuleType:
    module = _modules.get(key)
    if module is None:
        module = types.ModuleType(name or "__vmexec_dynamic__")
        for attr in ("__package__", "__name__", "__path__", "__file__"):
            if attr in attributes:
                module.__dict__[attr] = attributes[attr]
        module.__dict__["__builtins__"] = __builtins__
        _modules[key] = module
        _bindings[id(module.__dict__)] = {}
    return module


def _merge(namespace: dict[str, Any], values: dict[str, Any], numbers: dict[str, int]) -> None:
    """Put the client's ``values`` into ``namespace`` where they are new or newer."""
    held = _bindings.setdefault(id(namespace), {})
    for name, value in values.items():
        number = numbers.get(name, -1)
        if name not in namespace or number > held.get(name, -1):
            namespace[name] = value
            held[name] = number


def make_function(key: Hashable, code: types.CodeType, base_globals: dict[str, Any],
                  name: Optional[str], argdefs: Optional[tuple[Any, ...]],
                  closure: Optional[tuple[Any, ...]]) -> types.FunctionType:
    """Create a by-value function bound to its module's shared namespace."""
    module = _module_for(key, base_globals.get("__name__"), base_globals)
    return types.FunctionType(code, module.__dict__, name, argdefs, closure)


def set_function_state(func: types.FunctionType, state: tuple[Any, ...]) -> None:
    """cloudpickle's function state, with the globals merged by binding number."""
    attributes, slots, numbers = state
    func.__dict__.update(attributes)
    values = slots.pop("__globals__")
    closure_values = slots.pop("__closure__")
    slots.pop("_cloudpickle_submodules", None)  # only held the submodules imported
    _merge(func.__globals__, values, numbers)
    if closure_values is not None:
        for index, cell in enumerate(closure_values):
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            func.__closure__[index].cell_contents = value  # type: ignore[index]
    for attr, value in slots.items():
        setattr(func, attr, value)


def set_class_state(cls: type, state: Any) -> Any:
    """cloudpickle's class state the first time; later only attributes the class lacks.

    cloudpickle hands back the same class object each time a class arrives again, then
    resets its attributes to the client's values: a ``Model.instance`` the initializer
    set would be lost at the next task.
    """
    if cls not in _classes_set_up:
        _classes_set_up.add(cls)
        return _CLASS_SETSTATE(cls, state)
    attributes = state[0] if isinstance(state, tuple) else state
    for attr, value in attributes.items():
        if attr != "_abc_impl" and attr not in cls.__dict__:
            setattr(cls, attr, value)
    return cls


def make_module(key: Hashable, name: str, attributes: dict[str, Any],
                numbers: dict[str, int]) -> types.ModuleType:
    """A user module that came by value (``import mylib`` used by a task): one per key."""
    module = _module_for(key, name, attributes)
    _merge(module.__dict__, attributes, numbers)
    module.__dict__["__builtins__"] = __builtins__
    return module


def _cloudpickle_function(name: str) -> Any:
    for where in ("cloudpickle.cloudpickle", "cloudpickle.cloudpickle_fast"):
        module = sys.modules.get(where)
        if module is not None and hasattr(module, name):
            return getattr(module, name)
    raise ImportError(f"cloudpickle {cloudpickle.__version__} has no {name}: vmexec needs "
                      "cloudpickle>=2.0")


_CLASS_SETSTATE = _cloudpickle_function("_class_setstate")
