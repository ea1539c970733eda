"""Capture of this project's own test environment: distributions with exact versions and
sources (index, editable, VCS), a local module folder, environment variables (never AWS
credentials), the ``vmexec env`` printout, JSON round trip and content hash."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
from pathlib import Path

import pytest

import vmexec
from vmexec.environment import capture
from vmexec.environment.capture import find_local_code, main, resolve_environment
from vmexec.environment.spec import EnvSpec
from vmexec.errors import ConfigError, EnvSyncError


def _dist_info(site: Path, name: str, version: str, direct_url: dict | None) -> None:
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "INSTALLER").write_text("pip\n")
    (info / "top_level.txt").write_text(f"{name}\n")
    if direct_url is not None:
        (info / "direct_url.json").write_text(json.dumps(direct_url))


@pytest.fixture
def installs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """An editable install and a VCS install (real PEP 610 records on sys.path)."""
    project = tmp_path / "src" / "editme"
    (project / "editme").mkdir(parents=True)
    (project / "pyproject.toml").write_text('[project]\nname = "editme"\nversion = "0.5"\n')
    (project / "editme" / "__init__.py").write_text("X = 1\n")
    site = tmp_path / "site"
    _dist_info(site, "editme", "0.5", {"url": project.as_uri(), "dir_info": {"editable": True}})
    _dist_info(site, "fromgit", "1.2", {
        "url": "https://github.com/example/fromgit.git",
        "vcs_info": {"vcs": "git", "commit_id": "0123456789abcdef0123456789abcdef01234567",
                     "requested_revision": "main"}})
    monkeypatch.syspath_prepend(str(site))
    return {"project": project, "site": site}


def test_captures_this_environment_with_exact_versions_and_sources(
        installs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    spec = capture(paths=[])
    by_name = {d.key: d for d in spec.distributions}
    for name in ("cloudpickle", "psutil", "pytest"):
        assert by_name[name].version == importlib.metadata.version(name)
        assert by_name[name].source == "index" and by_name[name].url == ""
    assert by_name["vmexec"].version == vmexec.__version__ and by_name["vmexec"].is_local
    editable = by_name["editme"]
    assert (editable.source, editable.url, editable.compiled) == (
        "editable", str(installs["project"]), False)
    assert len(editable.source_hash) == 64
    git = by_name["fromgit"]
    assert git.source == "vcs" and git.requirement() == (
        "fromgit @ git+https://github.com/example/fromgit.git"
        "@0123456789abcdef0123456789abcdef01234567")
    assert "fromgit @ git+" in spec.direct_requirements()[0]
    lines = spec.requirement_lines()
    assert f"cloudpickle=={by_name['cloudpickle'].version}" in lines
    assert not any(line.startswith(("editme", "vmexec", "fromgit")) for line in lines)

    text = spec.text()
    assert text.startswith(f"Python {spec.python} (cpython)")
    assert f"  cloudpickle=={by_name['cloudpickle'].version}  (index)" in text
    assert f"  editme==0.5  (editable {installs['project']})" in text
    assert "local code: none" in text


def test_compiled_local_package_is_flagged(installs: dict[str, Path]) -> None:
    (installs["project"] / "editme" / "speedup.c").write_text("int f(void) { return 1; }\n")
    editable = {d.key: d for d in capture(paths=[]).distributions}["editme"]
    assert editable.compiled
    assert "compiled: built per architecture" in editable.describe()


def test_local_module_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = tmp_path / "work"
    (code / "mypkg" / "sub").mkdir(parents=True)
    (code / "mymod.py").write_text("def f():\n    return 1\n")
    (code / "mypkg" / "__init__.py").write_text("")
    (code / "mypkg" / "sub" / "__init__.py").write_text("")
    (code / "mypkg" / "table.csv").write_text("a,b\n1,2\n")  # data next to the code ships
    (code / "mypkg" / "__pycache__").mkdir()
    (code / "mypkg" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0")
    (code / "notapkg").mkdir()  # no __init__.py: not importable as a regular package
    (code / "notapkg" / "x.py").write_text("")
    for tooling in ("setup.py", "conftest.py", "bad-name.py", "json.py", "cloudpickle.py"):
        (code / tooling).write_text("")
    (code / "skipme.py").write_text("")
    monkeypatch.chdir(code)
    monkeypatch.syspath_prepend(str(code))
    spec = capture(exclude=["skipme"])
    [local] = [c for c in spec.local_code if c.root == str(code.resolve())]
    assert local.modules == ("mymod", "mypkg")
    assert [path for path, _ in local.files] == [
        "mymod.py", "mypkg/__init__.py", "mypkg/sub/__init__.py", "mypkg/table.csv"]
    assert "mymod, mypkg (4 files)" in spec.text()
    # A module found twice is taken from the first folder, as import would.
    again = find_local_code([str(code), str(code / "mypkg")], exclude=["skipme"])
    assert [c.modules for c in again] == [("mymod", "mypkg"), ("sub",)]
    with pytest.raises(EnvSyncError, match="exclude="):
        find_local_code([str(code)], max_bytes=10)


def test_content_hash_ignores_where_and_when(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "m.py").write_text("X = 1\n")
    spec = capture(paths=[str(tmp_path / "a")])

    def again() -> EnvSpec:
        # Same distributions as the first capture: a checkout being edited meanwhile
        # (vmexec's own source is hashed) must not make this test flaky.
        later = capture(paths=[str(tmp_path / "a")])
        return dataclasses.replace(later, distributions=spec.distributions)

    later = again()
    assert later.captured_at >= spec.captured_at
    assert later.content_hash == spec.content_hash
    (tmp_path / "a" / "m.py").write_text("X = 2\n")
    assert again().content_hash != spec.content_hash


def test_json_round_trip(tmp_path: Path) -> None:
    (tmp_path / "m.py").write_text("")
    spec = capture(paths=[str(tmp_path)], env={"MY_SETTING": "1"})
    back = EnvSpec.from_json(spec.to_json())
    assert back == spec and back.content_hash == spec.content_hash
    with pytest.raises(EnvSyncError, match="spec version"):
        EnvSpec.from_json(json.dumps({"spec_version": 99}))
    with pytest.raises(EnvSyncError, match="not an environment spec"):
        EnvSpec.from_json("[]")


def test_environment_variables_but_never_aws_credentials(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_TOKEN", "abc")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    spec = capture(paths=[], forward_env=["MY_TOKEN", "AWS_REGION"], env={"MODE": "fast"})
    assert dict(spec.env) == {"MY_TOKEN": "abc", "AWS_REGION": "eu-west-1", "MODE": "fast"}
    assert "environment variables: AWS_REGION, MODE, MY_TOKEN" in spec.text()
    for bad in ({"forward_env": ["AWS_SECRET_ACCESS_KEY"]},
                {"env": {"AWS_ACCESS_KEY_ID": "x"}},
                {"env": {"aws_session_token": "x"}},
                {"env": {"HIDDEN": "key=AKIAABCDEFGHIJKLMNOP"}}):
        with pytest.raises(ConfigError, match="AWS credentials never leave this computer"):
            capture(paths=[], **bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="not set in this environment"):
        capture(paths=[], forward_env=["VMEXEC_TEST_UNSET_VARIABLE"])
    with pytest.raises(ConfigError, match="list of names"):
        capture(paths=[], forward_env="MY_TOKEN")


def test_agent_distributions_cannot_be_excluded() -> None:
    with pytest.raises(ConfigError, match="cannot be left out"):
        capture(paths=[], exclude=["cloudpickle"])
    spec = capture(paths=[], exclude=["PyTest"])
    assert not spec.has_distribution("pytest") and spec.has_distribution("psutil")


def test_environment_option_values(tmp_path: Path) -> None:
    assert resolve_environment(None) is None
    listed = resolve_environment(["numpy>=2", "cloudpickle"], paths=[])
    assert listed is not None and listed.mode == "requirements"
    psutil_pin = f"psutil=={importlib.metadata.version('psutil')}"
    # The agent's own needs are pinned to the client's versions, unless named.
    assert listed.requirement_lines() == ["cloudpickle", "numpy>=2", psutil_pin]
    assert listed.has_distribution("vmexec")
    (tmp_path / "base.txt").write_text("requests==2.32.3  # pinned\n")
    (tmp_path / "requirements.txt").write_text("# deps\n-r base.txt\nnumpy\n")
    from_file = resolve_environment(str(tmp_path / "requirements.txt"), paths=[])
    assert from_file is not None and from_file.requirements == ("requests==2.32.3", "numpy")
    (tmp_path / "bad.txt").write_text("--index-url https://mirror/simple\nnumpy\n")
    with pytest.raises(ConfigError, match="index_url="):
        resolve_environment(str(tmp_path / "bad.txt"))
    with pytest.raises(ConfigError, match="requirements file"):
        resolve_environment("no-such-requirements.txt")
    with pytest.raises(ConfigError):
        resolve_environment(42)  # type: ignore[arg-type]


def test_vmexec_env_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "helpers_for_tasks.py").write_text("")
    assert main(["--path", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"cloudpickle=={importlib.metadata.version('cloudpickle')}  (index)" in out
    assert "helpers_for_tasks" in out
    assert main(["--json", "--path", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["python"].count(".") == 2
    assert main(["missing-requirements.txt"]) == 2
    assert "vmexec env:" in capsys.readouterr().err
    if os.environ.get("VMEXEC_ENV_TEST_PREFLIGHT"):  # pragma: no cover - manual
        assert main(["--preflight"]) == 0
