"""Adapters that plug vmexec into other libraries' extension points.

Each submodule owns one library and is the only place in vmexec that imports it:
``vmexec.integrations.joblib`` imports joblib, and so on. This package itself imports
nothing, so ``import vmexec`` works whether or not any of those libraries is installed.

Libraries that already accept a ``concurrent.futures.Executor`` or a ``map`` function
(dask, scipy, emcee, asyncio, tqdm) need no adapter: pass the ``VMExecutor`` or its
``map`` (see ``docs/integrations.md``). Only libraries with their own plugin interface
get a module here.

Public entry points live outside this package (``vmexec.joblib``), so that the import
path users type stays short and this layout can change.
"""
