"""Environment sync: the client's Python environment, reproduced on machines of any
architecture, without containers.

The pipeline (client side, before any launch, then per region, then on each machine)::

    resolve_environment / capture  -> EnvSpec            (capture.py, spec.py)
    preflight(spec, archs)         -> {arch: Resolution}  (preflight.py: uv pip compile,
                                                            refuses what has no build)
    build_artifacts                -> [Artifact]          (build.py: locks, local wheels,
                                                            code wheels; pack.py: conda-pack)
      (prepare_environment does the three steps above)
    stage_artifacts(session, ...)  -> presigned URLs      (stage.py: S3, once per region)
    install_script(prepared, ...)  -> bash for user-data  (install.py: uv venv + install,
                                                            writes opt/vmexec/env-hash)
      (too long for user-data: stage_script + bootstrap_script, a few lines)
    handshake: check_skew(environment_hash(spec), machine's read_machine_hash())
                                                          (vmexec.skew, below the scheduler)

Public names are re-exported here; ``stage`` (boto3) is imported on first use of its
names only, so this package imports without the ``aws`` extra.
"""

from __future__ import annotations

from typing import Any

from vmexec.environment.capture import capture, environment_hash, main, resolve_environment
from vmexec.environment.install import (
    PreparedEnvironment,
    bootstrap_script,
    build_artifacts,
    install_script,
    prepare_environment,
)
from vmexec.environment.pack import check_conda_arch, pack_environment
from vmexec.environment.preflight import Resolution, preflight
from vmexec.environment.spec import Artifact, EnvSpec
from vmexec.skew import check_skew, read_machine_hash

__all__ = [
    "Artifact",
    "EnvSpec",
    "PreparedEnvironment",
    "Resolution",
    "StagedArtifacts",
    "bootstrap_script",
    "build_artifacts",
    "capture",
    "check_conda_arch",
    "check_skew",
    "delete_staging",
    "environment_hash",
    "install_script",
    "main",
    "pack_environment",
    "preflight",
    "prepare_environment",
    "read_machine_hash",
    "resolve_environment",
    "stage_artifacts",
    "stage_script",
]

_STAGE_NAMES = ("StagedArtifacts", "stage_artifacts", "stage_script", "delete_staging")


def __getattr__(name: str) -> Any:
    # stage.py imports boto3 (the optional `aws` extra): only when asked for.
    if name in _STAGE_NAMES:
        from vmexec.environment import stage

        return getattr(stage, name)
    raise AttributeError(f"module 'vmexec.environment' has no attribute {name!r}")
