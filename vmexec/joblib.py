"""Run ``joblib.Parallel`` — and scikit-learn's ``n_jobs`` — on a vmexec fleet.

Importing this module registers the ``"vmexec"`` joblib backend:

```python
import joblib
import vmexec.joblib  # registers backend="vmexec"

# A fleet made for each Parallel call, sized by n_jobs, gone when the call ends:
with joblib.parallel_config(backend="vmexec", n_jobs=4, provider="local"):
    squares = joblib.Parallel()(joblib.delayed(pow)(i, 2) for i in range(100))

# Or an executor you manage, kept across calls (the backend never shuts it down):
with VMExecutor(max_workers=8, provider="local") as ex:
    with joblib.parallel_config(backend="vmexec", executor=ex):
        search.fit(X, y)  # e.g. GridSearchCV(..., n_jobs=-1)
```

Keyword arguments of ``parallel_config`` other than joblib's own are ``VMExecutor``
options. ``n_jobs=-1`` (or None, scikit-learn's default) means every slot of the
executor. Calls to ``Parallel`` inside tasks run sequentially in their worker.

Owns the public names and the registration; the backend itself lives in
``vmexec.integrations.joblib``, the only module that imports joblib. ``import vmexec``
never imports this module, so vmexec works without joblib installed.
"""

from __future__ import annotations

try:
    from vmexec.integrations.joblib import BACKEND_NAME, VMExecBackend, register
except ImportError as exc:  # pragma: no cover - exercised where joblib is absent
    if (exc.name or "").split(".")[0] != "joblib":
        raise
    raise ImportError(
        "vmexec.joblib needs joblib: pip install 'vmexec[joblib]' (or pip install joblib)",
        name=exc.name) from exc

__all__ = ["BACKEND_NAME", "VMExecBackend", "register"]

# Registering is this module's purpose: `import vmexec.joblib` is what makes
# parallel_config(backend="vmexec") work. Repeating it is harmless.
register()
