"""Staging in S3 (moto's in-process ``mock_aws``): one upload per region whatever the
fleet size, content-addressed reuse, the lifecycle rule and tags, teardown."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

boto3 = pytest.importorskip("boto3")
moto = pytest.importorskip("moto")
from botocore.utils import determine_content_length  # noqa: E402

from vmexec.environment.capture import find_local_code, source_tree_hash  # noqa: E402
from vmexec.environment.install import (  # noqa: E402
    bootstrap_script,
    built_builds,
    build_artifacts,
    install_script,
)
from vmexec.environment.preflight import preflight  # noqa: E402
from vmexec.environment.spec import Artifact, Distribution, EnvSpec  # noqa: E402
from vmexec.environment.stage import (  # noqa: E402
    EXPIRY_DAYS,
    bucket_name,
    delete_staging,
    stage_artifacts,
    stage_script,
    staged_fleets,
)

REGIONS = ["us-east-1", "eu-west-1"]


class UploadCounter:
    """Bytes of every PutObject/UploadPart body botocore sends, per region: counted on
    the wire side of the session, not by the code under test."""

    def __init__(self, session: Any) -> None:
        self.bytes: dict[str, int] = {}
        session.events.register("request-created.s3.PutObject", self._count)
        session.events.register("request-created.s3.UploadPart", self._count)

    def _count(self, request: Any, **_: Any) -> None:
        # With flexible checksums botocore streams the body aws-chunked; the decoded
        # length is the payload's size.
        header = request.headers.get("X-Amz-Decoded-Content-Length") or \
            request.headers.get("Content-Length")
        size = int(header) if header is not None else \
            determine_content_length(request.body) or 0
        match = re.search(r"vmexec-staging-\d+-([a-z0-9-]+?)(?:\.s3|/)", request.url)
        region = match.group(1) if match else "?"
        self.bytes[region] = self.bytes.get(region, 0) + size

    def take(self) -> dict[str, int]:
        taken, self.bytes = self.bytes, {}
        return taken


@pytest.fixture
def session(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    for key in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(key, raising=False)
    with moto.mock_aws():
        yield boto3.Session(region_name="us-east-1", aws_access_key_id="testing",
                            aws_secret_access_key="testing", aws_session_token="testing")


@pytest.fixture
def artifacts(tmp_path: Path) -> list[Artifact]:
    made = []
    for name, kind, size in (("lock-x86_64.txt", "lock", 3_000),
                             ("mylib-1.0-py3-none-any.whl", "wheel", 200_000),
                             ("fastlib-0.1.tar.gz", "sdist", 50_000)):
        path = tmp_path / name
        path.write_bytes(os.urandom(size))
        made.append(Artifact.from_file(str(path), kind, arch="x86_64" if kind == "lock"
                                       else None))
    return made


def test_upload_does_not_grow_with_the_fleet(session: Any, artifacts: list[Artifact]) -> None:
    counter = UploadCounter(session)
    total = sum(a.size for a in artifacts)
    per_fleet_size = {}
    for machines in (2, 20, 200):
        fleet = f"vmx-{machines}"
        staged = stage_artifacts(session, REGIONS, fleet, artifacts,
                                 archs=["x86_64", "aarch64"])
        # Every machine gets URLs; none of them costs the client an upload.
        urls = [a.url for _ in range(machines) for a in staged["us-east-1"].artifacts]
        assert len(urls) == machines * len(staged["us-east-1"].artifacts)
        per_fleet_size[machines] = counter.take()
        delete_staging(session, REGIONS, fleet)
    assert per_fleet_size[2] == per_fleet_size[20] == per_fleet_size[200]
    assert per_fleet_size[2] == {r: total for r in REGIONS}


def test_second_run_uploads_nothing_and_teardown_removes_everything(
        session: Any, artifacts: list[Artifact], tmp_path: Path) -> None:
    counter = UploadCounter(session)
    first = stage_artifacts(session, REGIONS, "vmx-a", artifacts, archs=["x86_64", "aarch64"])
    assert all(s.uploaded_bytes == sum(a.size for a in artifacts) for s in first.values())
    counter.take()
    again = stage_artifacts(session, REGIONS, "vmx-a", artifacts, archs=["x86_64"])
    assert counter.take() == {r: 0 for r in REGIONS}  # only 0-byte references
    assert all(s.uploaded_bytes == 0 and len(s.reused) == 3 for s in again.values())

    # Only the user's code changed: only that file goes up.
    changed = tmp_path / "mylib-1.0-py3-none-any.whl"
    changed.write_bytes(os.urandom(1234))
    new_wheel = Artifact.from_file(str(changed), "wheel")
    third = stage_artifacts(session, ["us-east-1"], "vmx-a",
                            [artifacts[0], new_wheel, artifacts[2]])
    assert third["us-east-1"].uploaded == [new_wheel.name]
    assert counter.take() == {"us-east-1": 1234}

    s3 = session.client("s3", region_name="us-east-1")
    account = session.client("sts").get_caller_identity()["Account"]
    bucket = bucket_name(account, "us-east-1")
    rules = s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    assert rules[0]["Status"] == "Enabled" and rules[0]["Expiration"]["Days"] == EXPIRY_DAYS
    tags = {t["Key"]: t["Value"] for t in s3.get_bucket_tagging(Bucket=bucket)["TagSet"]}
    assert tags["vmexec:fleet"] == "vmx-a" and tags["vmexec:owner"] and tags["vmexec:created"]
    block = s3.get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"]
    assert all(block.values())
    assert staged_fleets(session, REGIONS) == {r: {"vmx-a"} for r in REGIONS}

    delete_staging(session, REGIONS, "vmx-a")
    names = {b["Name"] for b in s3.list_buckets()["Buckets"]}
    assert not any(name.startswith("vmexec-staging-") for name in names)
    assert staged_fleets(session, REGIONS) == {r: set() for r in REGIONS}
    delete_staging(session, REGIONS, "vmx-a")  # idempotent


def test_shared_artifacts_survive_another_fleets_teardown(session: Any,
                                                          artifacts: list[Artifact]) -> None:
    stage_artifacts(session, ["us-east-1"], "vmx-one", artifacts)
    stage_artifacts(session, ["us-east-1"], "vmx-two", artifacts[:1])
    deleted = delete_staging(session, ["us-east-1"], "vmx-one")
    # vmx-two still references the lock: only the other two artifacts (and vmx-one's
    # references) went.
    assert deleted["us-east-1"] == 3 + 2
    staged = stage_artifacts(session, ["us-east-1"], "vmx-two", artifacts[:1])
    assert staged["us-east-1"].uploaded == []
    delete_staging(session, ["us-east-1"], "vmx-two")
    s3 = session.client("s3", region_name="us-east-1")
    assert s3.list_buckets()["Buckets"] == []


def test_presigned_urls_and_per_arch_build_slots(session: Any,
                                                 artifacts: list[Artifact]) -> None:
    staged = stage_artifacts(session, ["eu-west-1"], "vmx-u", artifacts,
                             archs=["x86_64", "aarch64"], url_seconds=600)
    region = staged["eu-west-1"]
    sdists = [a for a in region.artifacts if a.kind == "sdist"]
    assert sorted(a.arch for a in sdists) == ["aarch64", "x86_64"]
    for a in region.artifacts:
        assert a.url.startswith("https://") and "X-Amz-Signature=" in a.url
        assert f"/vmexec/a/{a.sha256}/" in a.url and "X-Amz-Expires=600" in a.url
    for a in sdists:
        assert f"/{a.sha256}/{a.arch}.tar" in a.build_put_url
        assert "/vmexec/builds/" in a.build_put_url  # .../builds/<owner>/<sha>/<arch>.tar
        assert a.build_url.split("?")[0] == a.build_put_url.split("?")[0]
    # No credential travels in a URL: only the signature and the access key id.
    assert all("testing" not in a.url.split("X-Amz-Credential=")[0] for a in region.artifacts)
    delete_staging(session, ["eu-west-1"], "vmx-u")


# moto_server (aws_fixtures): moto as an HTTP server on 127.0.0.1, so that curl can
# fetch presigned URLs.


def boot(script: str, root: Path, check: str) -> tuple[str, str]:
    """Run ``script`` as a machine rooted at ``root`` would, then ``check`` in its venv;
    returns both outputs."""
    env = {k: v for k, v in os.environ.items() if k != "UV_CACHE_DIR"}
    env.update(VMEXEC_ROOT=str(root), PY=sys.executable, no_proxy="127.0.0.1",
               NO_PROXY="127.0.0.1")
    result = subprocess.run(["bash", "-c", script], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    python = root / "opt" / "vmexec" / "venv" / "bin" / "python"
    out = subprocess.run([str(python), "-c", check], capture_output=True, text=True,
                         timeout=60, cwd=str(root.parent))
    assert out.returncode == 0, out.stderr
    return result.stdout, out.stdout.strip()


def test_machine_pulls_everything_with_presigned_urls(tmp_path: Path,
                                                      moto_server: str) -> None:
    """End to end over HTTP: artifacts and the install script staged in a moto server's
    S3, user-data of a few lines fetches the script, the script fetches the artifacts
    (curl, sha256-checked) and installs them offline; teardown empties the bucket."""
    from test_env_preflight import make_wheel

    arch = platform.machine()
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    make_wheel(wheels, "purepkg", "2.0", "py3-none-any")
    code = tmp_path / "code"
    code.mkdir()
    (code / "pulled.py").write_text("WHERE = 'from S3'\n")
    spec = EnvSpec(python=".".join(map(str, sys.version_info[:3])), mode="requirements",
                   requirements=("purepkg==2.0",),
                   local_code=tuple(find_local_code([str(code)])))
    resolutions = preflight(spec, [arch], find_links=[str(wheels)])
    artifacts = build_artifacts(spec, resolutions, str(tmp_path / "work"),
                                str(tmp_path / "cache"))

    endpoint = moto_server
    session = boto3.Session(region_name="us-east-1", aws_access_key_id="testing",
                            aws_secret_access_key="testing")
    staged = stage_artifacts(session, ["us-east-1"], "vmx-e2e", artifacts,
                             archs=[arch], endpoint_url=endpoint)
    script = install_script(spec, arch, staged["us-east-1"].artifacts,
                            find_links=[str(wheels)])
    assert all(a.url.startswith(endpoint) for a in staged["us-east-1"].artifacts)
    [staged_script] = stage_script(session, {"us-east-1": script}, "vmx-e2e",
                          endpoint_url=endpoint).values()
    user_data = bootstrap_script(staged_script)
    assert len(user_data) < 2000 and "<<" not in user_data
    _, printed = boot(user_data, tmp_path / "machine",
                      "import pulled, purepkg; print(pulled.WHERE)")
    assert printed == "from S3"

    delete_staging(session, ["us-east-1"], "vmx-e2e", endpoint_url=endpoint)
    s3 = session.client("s3", endpoint_url=endpoint)
    assert not [b for b in s3.list_buckets()["Buckets"]
                if b["Name"].startswith("vmexec-staging-")]


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_compiled_local_package_is_built_by_the_first_machine_and_shared(
        tmp_path: Path, moto_server: str) -> None:
    project = tmp_path / "cext"
    (project / "cext").mkdir(parents=True)
    (project / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=61"]\n'
        'build-backend = "setuptools.build_meta"\n'
        '[project]\nname = "cext"\nversion = "0.1"\n')
    (project / "setup.py").write_text(
        "from setuptools import Extension, setup\n"
        "setup(packages=['cext'], ext_modules=[Extension('cext._speed', ['cext/speed.c'])])\n")
    (project / "cext" / "__init__.py").write_text("from cext._speed import answer\n")
    (project / "cext" / "speed.c").write_text(
        "#include <Python.h>\n"
        "static PyObject *answer(PyObject *s, PyObject *a) { return PyLong_FromLong(42); }\n"
        "static PyMethodDef m[] = {{\"answer\", answer, METH_NOARGS, 0}, {0}};\n"
        "static struct PyModuleDef d = {PyModuleDef_HEAD_INIT, \"_speed\", 0, -1, m};\n"
        "PyMODINIT_FUNC PyInit__speed(void) { return PyModule_Create(&d); }\n")
    dist = Distribution("cext", "0.1", "local", str(project), compiled=True,
                        source_hash=source_tree_hash(str(project)))
    spec = EnvSpec(python=".".join(map(str, sys.version_info[:3])), mode="auto",
                   distributions=(dist,))
    arch = platform.machine()
    resolutions = preflight(spec, [arch])
    assert resolutions[arch].per_arch_builds == ("cext",)
    artifacts = build_artifacts(spec, resolutions, str(tmp_path / "work"),
                                str(tmp_path / "cache"))
    assert sorted(a.kind for a in artifacts) == ["lock", "sdist"]
    session = boto3.Session(region_name="us-east-1", aws_access_key_id="testing",
                            aws_secret_access_key="testing")
    staged = stage_artifacts(session, ["us-east-1"], "vmx-cext", artifacts, archs=[arch],
                             endpoint_url=moto_server)
    outputs = []
    built: dict[str, str] = {}
    for machine in ("first", "second"):
        # Later machines get the sha256 the first one reported (the client reads it).
        script = install_script(spec, arch, staged["us-east-1"].artifacts,
                                build_sha256=built)
        log_text, printed = boot(script, tmp_path / machine,
                                 "import cext; print(cext.answer())")
        assert printed == "42"
        outputs.append(log_text)
        built = {**built_builds(log_text), **built}
    shared = f"cext-0.1.tar.gz: using the {arch} build another machine shared"
    assert shared not in outputs[0] and shared in outputs[1]
    assert list(built) == [f"cext-0.1.tar.gz/{arch}"]
    delete_staging(session, ["us-east-1"], "vmx-cext", endpoint_url=moto_server)
