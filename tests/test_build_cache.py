"""The shared build cache cannot be poisoned (issue 12, item 4).

The first machine of an architecture shares its build of a compiled local package
through a presigned PUT; later machines fetch it instead of compiling. Anyone who can
write to the staging bucket must not be able to slip another build in: build keys are
per owner, the PUT is conditional (``If-None-Match: *``: S3 refuses to replace a build)
and short-lived, and a machine installs a shared build only when its sha256 is the one
the client learned from the machine that uploaded it.

Against a moto server over HTTP (curl, as on a machine).
"""

from __future__ import annotations

import hashlib
import subprocess
import urllib.parse
from pathlib import Path
from typing import Any

import boto3

from vmexec.environment import install
from vmexec.environment.install import built_builds
from vmexec.environment.spec import Artifact
from vmexec.environment.stage import BUILD_PUT_SECONDS, owner_id, stage_artifacts

REGION = "us-east-1"


def staged_sdist(tmp_path: Path, endpoint: str) -> tuple[Artifact, Any]:
    sdist = tmp_path / "cext-0.1.tar.gz"
    sdist.write_bytes(b"not really an sdist")
    artifact = Artifact(name=sdist.name, kind="sdist",
                        sha256=hashlib.sha256(sdist.read_bytes()).hexdigest(),
                        size=sdist.stat().st_size, path=str(sdist))
    session = boto3.Session(region_name=REGION, aws_access_key_id="testing",
                            aws_secret_access_key="testing")
    staged = stage_artifacts(session, [REGION], "vmx-cache", [artifact], archs=["x86_64"],
                             endpoint_url=endpoint)[REGION]
    [built] = [a for a in staged.artifacts if a.kind == "sdist"]
    return built, session


def curl_put(url: str, body: Path, *headers: str) -> int:
    """HTTP status of a PUT of ``body`` to ``url`` (as the install script sends it)."""
    args = [a for h in headers for a in ("-H", h)]
    done = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", "PUT",
                           *args, "--upload-file", str(body), url],
                          capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "no_proxy": "127.0.0.1",
                               "NO_PROXY": "127.0.0.1"})
    return int(done.stdout or 0)


def test_build_put_is_per_owner_conditional_and_short_lived(
        tmp_path: Path, moto_server: str) -> None:
    endpoint = moto_server  # aws_fixtures: moto over HTTP on 127.0.0.1, for curl
    built, session = staged_sdist(tmp_path, endpoint)
    caller = session.client("sts", endpoint_url=endpoint).get_caller_identity()["Arn"]
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(built.build_put_url).query)
    # Per owner: the key holds a hash of the caller's identity.
    assert f"/builds/{owner_id(caller)}/{built.sha256}/x86_64.tar" in built.build_put_url
    assert built.build_url.split("?")[0] == built.build_put_url.split("?")[0]
    # Short-lived, though artifact URLs live 12 hours.
    assert int(query["X-Amz-Expires"][0]) == BUILD_PUT_SECONDS <= 3600
    # Conditional: the signature covers If-None-Match, so S3 refuses the URL without
    # it (moto does not check signatures: the signed header list is what we can see)...
    assert "if-none-match" in query["X-Amz-SignedHeaders"][0].split(";")
    first, second = tmp_path / "first.tar", tmp_path / "second.tar"
    first.write_bytes(b"the genuine build")
    second.write_bytes(b"a poisoned build")
    # ... and S3 refuses to replace what the first machine shared.
    assert curl_put(built.build_put_url, first, "If-None-Match: *") == 200
    assert curl_put(built.build_put_url, second, "If-None-Match: *") == 412


def test_a_shared_build_is_installed_only_with_the_learned_sha256(tmp_path: Path) -> None:
    """vx_build, as a machine runs it: a download whose sha256 differs from the one the
    client learned is not installed; without a learned sha256 nothing is fetched."""
    served = tmp_path / "served.tar"
    served.write_bytes(b"poisoned")
    genuine = hashlib.sha256(b"genuine").hexdigest()
    common = install._COMMON.split("vx_uv=$(command -v uv")[0]  # helpers only
    functions = common.format(token="t", base="b", token_short="t", mode="auto",
                              vx_get=install.VX_GET, pip_index="", uv_index="", major=3,
                              minor=11, minor_version="3.11", check="''", check_names="",
                              uv_version="0", uv_locks="", built_marker="X")
    build = install._COMMON[install._COMMON.index("vx_build() {{"):
                            install._COMMON.index("vx_done() {{")]
    build = build.replace("{{", "{").replace("}}", "}").replace("{uv_index}", "") \
        .replace("{built_marker}", install.BUILT_MARKER)
    script = (functions + 'vx_arch=x86_64\n'
              'vx_get() { cp "$VX_SERVED" "$2"; echo fetched >>"$VMEXEC_ROOT/fetches"; }\n'
              'vx_compiler() { :; }\n'
              'vx_uv=false\n'  # "building" fails: we only look at the choice made
              + build + 'vx_build cext.tar.gz http://x/get "" "$VX_WANT"\n')
    for want in (genuine, ""):
        root = tmp_path / f"machine-{bool(want)}"
        done = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                              env={"PATH": "/usr/bin:/bin", "VMEXEC_ROOT": str(root),
                                   "VX_SERVED": str(served), "VX_WANT": want}, timeout=60)
        assert "using the x86_64 build another machine shared" not in done.stdout
        assert done.returncode != 0  # it went on to build (which fails here)
        if want:
            assert "is not the one recorded (sha256 differs): building here" in done.stdout
        else:
            assert not (root / "fetches").exists()


def test_the_client_reads_the_shared_builds_sha256() -> None:
    sha = "ab" * 32
    output = f"[vmexec-env] building\n{install.BUILT_MARKER} cext-0.1.tar.gz amd64 {sha}\n"
    assert built_builds(output) == {"cext-0.1.tar.gz/x86_64": sha}
