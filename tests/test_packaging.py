"""Packaging: six wheels, each holding only haillm/<name>/ (PEP 420, no haillm/__init__.py),
and one wheel importable on its own, without the other packages."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NAMES = ["flashattn", "fusedops", "parallel", "pipeline", "zero", "trainer"]


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> dict[str, Path]:
    uv = os.environ.get("UV") or shutil.which("uv")  # `uv run` exports its own path as UV
    if uv is None:
        pytest.fail("uv is needed to build the wheels (pip install uv)")
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([uv, "build", "--all-packages", "--wheel", "-q", "-o", str(out)],
                   cwd=ROOT, check=True)
    found = {w.name.split("-")[0].removeprefix("haillm_"): w for w in out.glob("*.whl")}
    assert sorted(found) == sorted(NAMES)
    return found


@pytest.mark.parametrize("name", NAMES)
def test_wheel_holds_only_its_package(wheels, name):
    files = zipfile.ZipFile(wheels[name]).namelist()
    code = [f for f in files if ".dist-info/" not in f]
    assert code, f"wheel of {name} is empty"
    assert all(f.startswith(f"haillm/{name}/") for f in code), code
    assert "haillm/__init__.py" not in files  # PEP 420 namespace
    assert f"haillm/{name}/py.typed" in files


def test_one_wheel_imports_alone(wheels, tmp_path):
    target = tmp_path / "site"
    # A pure-Python wheel installs by unpacking (the uv environment has no pip).
    zipfile.ZipFile(wheels["flashattn"]).extractall(target)
    # -S: no site processing, so the workspace's editable .pth files are not read; we add the
    # environment's site-packages (for torch) by hand, without its .pth files.
    site = sysconfig.get_paths()["purelib"]
    code = (
        "import sys, importlib.util as u; "
        f"sys.path[:0] = [{str(target)!r}, {site!r}]; "
        "import haillm.flashattn as m; "
        f"assert m.__file__.startswith({str(target)!r}), m.__file__; "
        "assert u.find_spec('haillm.fusedops') is None; "
        "print('ok')"
    )
    res = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
