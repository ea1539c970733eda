"""The layers of vmexec, as data, and the checks that hold the code to them.

Read ``LAYERS`` from the bottom up: each tier may import the tiers below it and itself,
never a tier above. Layers side by side in one tier are independent: they do not
import each other. A module belongs to the layer with the longest prefix that names it
(``vmexec.providers.ec2.fleet`` -> ``providers``); a new module outside every prefix
fails ``test_every_module_has_a_layer``: add it to the table.

Three checks, each with a message that names the rule:

* static (``test_imports_follow_the_layers``): every ``import`` in every module --
  inside functions and ``if TYPE_CHECKING:`` blocks too -- against the table, plus
  ``INTERFACES`` (what the core may see of providers and transports) and
  ``THIRD_PARTY`` (which modules may import each optional library);
* at run time (``test_importing_a_layer_loads_nothing_above_it``): each layer imported
  in a clean interpreter, and what ``sys.modules`` then holds -- this catches what the
  text cannot (a package ``__init__`` pulling in its children, ``importlib``);
* the agent, which runs on bare machines, has its own tighter check:
  tests/test_agent_imports.py.

``KNOWN_EXCEPTIONS`` lists the imports that break a rule today, each with the change
that removes it. It only shrinks: an exception that is no longer needed is reported
as a warning (delete its line).

docs/contributing.md explains the layers for people; this file is the rule.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

import vmexec

ROOT = Path(vmexec.__file__).resolve().parent


@dataclass(frozen=True)
class Layer:
    name: str
    modules: tuple[str, ...]  # module prefixes: a package stands for all its modules
    owns: str


# Bottom first. A tier may import itself and the tiers below; layers in one tier are
# independent of each other.
LAYERS: list[list[Layer]] = [
    [Layer("core", ("vmexec._version", "vmexec.errors", "vmexec.config", "vmexec.retry",
                    "vmexec.logs", "vmexec.progress", "vmexec.skew"),
           "the exception tree, options, retry policies, log and progress output, the "
           "environment skew check: what every layer may use")],
    [Layer("protocol", ("vmexec.protocol", "vmexec.agent", "vmexec.pickling"),
           "frames and messages, the agent that runs on machines, pickling user code")],
    [Layer("environment", ("vmexec.environment",),
           "capturing the client's Python environment, building and staging it"),
     Layer("guardrails", ("vmexec.guardrails",),
           "prices, cost plans and limits, idle shutdown, log volume"),
     Layer("transports", ("vmexec.transports",),
           "a byte stream to an agent: SSH or local pipes")],
    [Layer("providers", ("vmexec.providers",),
           "making and destroying machines: local, ssh (static hosts), ec2")],
    [Layer("scheduler", ("vmexec.scheduler", "vmexec.scheduling"),
           "the queue, in-flight windows, retries, the demand signal")],
    [Layer("executor", ("vmexec.executor", "vmexec.compare"),
           "the public Executor API (and compare(), which runs it)")],
    [Layer("cli", ("vmexec.cli", "vmexec.__main__"),
           "the vmexec command (ls, cleanup, prices, doctor, env; python -m vmexec)"),
     Layer("integrations", ("vmexec.integrations", "vmexec.joblib"),
           "joblib and other libraries, through the public API"),
     Layer("testing", ("vmexec.testing",),
           "the offline harness: sshd, local cloud, fake VMs, simulated fleets")],
]

# ``vmexec`` itself: public names resolved on first use (PEP 562). Importing the package
# loads only vmexec._version (tests/test_agent_imports.py), so any module may; a name
# taken from it (``from vmexec import VMExecutor``) counts as an import of the module
# that defines the name.
PACKAGE = "vmexec"

# What the core (scheduler, executor) may see of the layers below it that make and
# reach machines: their interfaces, never a concrete provider or transport (those are
# chosen by name through the provider registry, vmexec.providers), and nothing of the
# environment (providers prepare it; the handshake's check is vmexec.skew, in core).
INTERFACES: dict[str, tuple[str, ...]] = {
    "providers": ("vmexec.providers", "vmexec.providers.base"),
    "transports": ("vmexec.transports", "vmexec.transports.base", "vmexec.transports.aio"),
    "environment": (),
}
INTERFACE_USERS = ("scheduler", "executor")

# Every third-party library vmexec imports, and the modules that may import it: the
# dependencies of every install (cloudpickle, tenacity, psutil, cryptography, paramiko,
# asyncssh) are kept where they belong, and the optional ones (extras in
# pyproject.toml) must not leak into modules that run without them. A library missing
# here fails the test: add it, with the modules that need it.
THIRD_PARTY: dict[str, tuple[str, ...]] = {
    "cloudpickle": ("vmexec.pickling", "vmexec.agent", "vmexec.testing.simfleet"),
    "tenacity": ("vmexec.retry",),
    "psutil": ("vmexec.agent", "vmexec.testing"),
    "cryptography": ("vmexec.providers.ec2.userdata",),
    "paramiko": ("vmexec.transports.ssh",),
    "asyncssh": ("vmexec.transports.ssh_async", "vmexec.testing.simfleet"),
    "boto3": ("vmexec.providers.ec2", "vmexec.environment.stage", "vmexec.testing"),
    "botocore": ("vmexec.providers.ec2", "vmexec.environment.stage", "vmexec.testing"),
    "conda_pack": ("vmexec.environment.pack",),
    "uv": ("vmexec.environment.preflight", "vmexec.testing"),
    "tqdm": ("vmexec.progress",),
    "joblib": ("vmexec.integrations.joblib",),
    "moto": ("vmexec.testing",),
    "werkzeug": ("vmexec.testing",),
    "packaging": ("vmexec.testing",),
    "pytest": ("vmexec.testing",),
}
# Not checked at run time: other libraries load these (paramiko and asyncssh load
# cryptography; pytest, setuptools and many more load packaging).
LOADED_BY_OTHERS = {"cryptography", "packaging"}

# Imports that break a rule today: (importer, imported module or library) -> the fix;
# a package stands for its modules on both sides. This list only shrinks.
KNOWN_EXCEPTIONS: dict[tuple[str, str], str] = {
    # boto3 lives under providers/ec2 and environment/stage only (STYLE.md). The price
    # list sits below the providers, so it should be handed what it needs (a session
    # or a fetch function) by its caller, the EC2 provider or the CLI (which reaches
    # AWS through providers.ec2.clients).
    ("vmexec.guardrails.pricing", "boto3"):
        "guardrails/pricing.py: take the session/clients from the caller",
    ("vmexec.guardrails.pricing", "botocore"):
        "guardrails/pricing.py: let the caller translate AWS errors",
}


# --- the table, read -------------------------------------------------------------------

_TIER = {layer.name: i for i, tier in enumerate(LAYERS) for layer in tier}
_BY_NAME = {layer.name: layer for tier in LAYERS for layer in tier}


def _matches(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def layer_of(module: str) -> str | None:
    """The layer whose longest prefix names ``module`` (None: not in the table)."""
    best: tuple[int, str] | None = None
    for layer in _BY_NAME.values():
        for prefix in layer.modules:
            if _matches(module, prefix) and (best is None or len(prefix) > best[0]):
                best = (len(prefix), layer.name)
    return best[1] if best else None


def may_import(importer: str, imported: str) -> bool:
    """Whether layer ``importer`` may import layer ``imported``."""
    return importer == imported or _TIER[imported] < _TIER[importer]


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        if "scripts" in path.relative_to(ROOT).parts:
            continue  # programs run on machines, not modules (tests/test_scripts.py)
        parts = ("vmexec", *path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _public_name_module(name: str) -> str:
    """The module behind ``from vmexec import <name>``."""
    if f"vmexec.{name}" in MODULES:
        return f"vmexec.{name}"
    lazy = getattr(vmexec, "_LAZY", {})
    if name in lazy:
        return str(lazy[name])
    if name == "__version__":
        return "vmexec._version"
    if name in vmexec.__all__:
        return "vmexec.errors"
    return PACKAGE


def imports_of(module: str) -> Iterator[tuple[int, str]]:
    """``(line, imported name)`` for every import in ``module``, at any depth: vmexec
    modules resolved (relative imports, ``from pkg import submodule``), other libraries
    by their top-level name; the standard library left out."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source == PACKAGE:
                targets = [_public_name_module(alias.name) for alias in node.names]
            else:
                targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in MODULES
                           else source for alias in node.names]
        else:
            continue
        for target in targets:
            top = target.partition(".")[0]
            if top == "vmexec" or (top not in sys.stdlib_module_names and top != "__future__"):
                yield node.lineno, target if top == "vmexec" else top


def violations() -> tuple[list[str], set[tuple[str, str]]]:
    """Every broken rule (``KNOWN_EXCEPTIONS`` left out), and the exceptions used."""
    found, used = [], set()
    for module in MODULES:
        mine = layer_of(module)
        if mine is None:
            continue
        for line, target in imports_of(module):
            where = f"{MODULES[module].relative_to(ROOT.parent)}:{line}"
            problem = _problem(module, mine, target)
            if problem is None:
                continue
            known = next((k for k in KNOWN_EXCEPTIONS
                          if _matches(module, k[0]) and _matches(target, k[1])), None)
            if known:
                used.add(known)
            else:
                found.append(f"{where}: {module} ({mine}) imports {target}: {problem}")
    return found, used


def _problem(module: str, mine: str, target: str) -> str | None:
    if target == PACKAGE:
        return None
    if not target.startswith("vmexec."):
        allowed = THIRD_PARTY.get(target)
        if allowed is None:
            return (f"{target} is in no row of THIRD_PARTY (tests/test_layers.py): add it "
                    "with the modules that need it (and the extra in pyproject.toml)")
        if any(_matches(module, prefix) for prefix in allowed):
            return None
        return f"only {', '.join(allowed)} may import {target}"
    theirs = layer_of(target)
    if theirs is None:
        return None  # reported by test_every_module_has_a_layer
    if not may_import(mine, theirs):
        above = "a layer above" if _TIER[theirs] > _TIER[mine] else "an independent layer"
        return f"{theirs} is {above} {mine} (LAYERS in tests/test_layers.py)"
    if mine in INTERFACE_USERS and theirs in INTERFACES and target not in INTERFACES[theirs]:
        if not INTERFACES[theirs]:
            return f"{mine} must not import {theirs} (INTERFACES in tests/test_layers.py)"
        return (f"{mine} sees {theirs} through {', '.join(INTERFACES[theirs])} only "
                "(INTERFACES in tests/test_layers.py)")
    return None


# --- the checks -----------------------------------------------------------------------

def test_every_module_has_a_layer() -> None:
    missing = [m for m in MODULES if m != PACKAGE and layer_of(m) is None]
    assert not missing, (f"modules in no layer: {missing}: add them to LAYERS in "
                         "tests/test_layers.py (and docs/contributing.md)")


def test_imports_follow_the_layers() -> None:
    found, used = violations()
    assert not found, "imports that break the layers:\n" + "\n".join(found)
    for stale in sorted(set(KNOWN_EXCEPTIONS) - used):
        warnings.warn(f"KNOWN_EXCEPTIONS{stale} is no longer needed: delete it from "
                      "tests/test_layers.py", UserWarning, stacklevel=1)


def test_a_violation_is_caught() -> None:
    """The checker itself: an upward import, a sibling import, a concrete provider in
    the scheduler, boto3 outside its modules, an unknown library."""
    assert _problem("vmexec.protocol", "protocol", "vmexec.scheduler")
    assert _problem("vmexec.transports.ssh", "transports", "vmexec.environment.capture")
    assert _problem("vmexec.scheduler", "scheduler", "vmexec.providers.ec2")
    assert _problem("vmexec.executor", "executor", "vmexec.environment.spec")
    assert _problem("vmexec.transports.ssh", "transports", "boto3")
    assert _problem("vmexec.errors", "core", "requests")
    assert _problem("vmexec.scheduler", "scheduler", "vmexec.providers.base") is None
    assert _problem("vmexec.providers.ec2", "providers", "vmexec.environment.stage") is None


def _loaded_after_importing(modules: list[str]) -> list[str]:
    code = ("import importlib, json, sys\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            "print(json.dumps(sorted(sys.modules)))\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, timeout=120)
    return list(json.loads(out.stdout.strip().splitlines()[-1]))


def _runtime_layers(name: str) -> tuple[set[str], set[str]]:
    """The layers importing ``name`` may load (below it, itself, and what the known
    exceptions of those reach), and those of them it may load only the INTERFACES of."""
    allowed = {other for other in _TIER if may_import(name, other)}
    excepted: set[str] = set()
    for importer, imported in KNOWN_EXCEPTIONS:
        theirs = layer_of(imported)
        if theirs is not None and str(layer_of(importer)) in allowed:
            excepted |= {other for other in _TIER if may_import(theirs, other)}
    narrowed = set(INTERFACES) - excepted if name in INTERFACE_USERS else set()
    return allowed | excepted, narrowed


@pytest.mark.parametrize("name", [layer.name for tier in LAYERS for layer in tier])
def test_importing_a_layer_loads_nothing_above_it(name: str) -> None:
    layer = _BY_NAME[name]
    modules = [m for m in MODULES if layer_of(m) == name and not m.endswith("__main__")]
    loaded = _loaded_after_importing(modules)
    allowed, narrowed = _runtime_layers(name)
    ours = {m for m in loaded if m.startswith("vmexec.")}
    above = sorted(m for m in ours if layer_of(m) not in allowed)
    assert not above, (f"importing the {name} layer ({', '.join(layer.modules)}) loads "
                       f"{above}: layers above it or beside it (LAYERS in tests/test_layers.py)")
    behind = sorted(m for m in ours if layer_of(m) in narrowed
                    and m not in INTERFACES[str(layer_of(m))])
    assert not behind, (f"importing the {name} layer loads {behind}: it may load only the "
                        "interfaces of those layers (INTERFACES in tests/test_layers.py)")
    # An optional library that no module of an allowed layer may import must not load.
    libraries = {m.partition(".")[0] for m in loaded}
    for library, importers in THIRD_PARTY.items():
        if library in LOADED_BY_OTHERS:
            continue
        reachable = any(layer_of(prefix) in allowed for prefix in importers)
        assert reachable or library not in libraries, (
            f"importing the {name} layer loads {library}, which only "
            f"{', '.join(importers)} may import")
