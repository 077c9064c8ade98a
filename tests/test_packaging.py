"""The distribution installs the way the design card says: one namespace, light imports."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, **kwargs) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, **kwargs
    )
    return out.stdout.strip()


def test_editable_install_maps_backends_into_the_namespace():
    path = _run("import cwca_export.backends as b; print(b.__file__)", cwd="/")
    assert Path(path) == ROOT / "backends" / "__init__.py"
    # never installed as a bare top-level module
    missing = _run("import importlib.util as u; print(u.find_spec('backends') is None)", cwd="/")
    assert missing == "True"


@pytest.mark.parametrize("module", ["cwca_export", "cwca_export.planning.solver", "cwca_export.planning.plan"])
def test_numpy_side_does_not_import_torch(module):
    loaded = _run(f"import sys, {module}; print('torch' in sys.modules)", cwd="/")
    assert loaded == "False"


def test_built_wheel_installs_backends_under_cwca_export(tmp_path):
    # build from a copy so setuptools' build/ folder never lands in the checkout
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("cwca_export", "backends", "recipes"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True, text=True, check=True,
    )
    (wheel,) = (tmp_path / "dist").glob("cwca_export-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    # every module of the tree ships, backends/ inside the namespace and nowhere else
    expected = {p.relative_to(ROOT).as_posix() for p in (ROOT / "cwca_export").rglob("*.py")}
    for folder in ("backends", "recipes"):  # mapped into the namespace
        shipped = [*(ROOT / folder).rglob("*.py"), *(ROOT / folder).rglob("*.yaml")]
        expected |= {f"cwca_export/{p.relative_to(ROOT).as_posix()}" for p in shipped}
    assert expected <= names, sorted(expected - names)
    assert not any(n.startswith(("backends/", "recipes/")) for n in names)
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel)],
        capture_output=True, text=True, check=True,
    )
    # isolated interpreter (-I): only the wheel's copy can satisfy the import
    code = (
        f"import sys; sys.path.insert(0, {str(target)!r}); "
        "import cwca_export.backends as b, cwca_export.planning.solver; print(b.__file__)"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path
    ).stdout.strip()
    assert Path(out).is_relative_to(target)


def test_console_script_and_module_entry_point():
    exe = Path(sys.executable).with_name("cwca-export")
    for cmd in ([str(exe), "--help"], [sys.executable, "-m", "cwca_export", "--help"]):
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        for verb in ("score", "plan", "compress", "export", "run", "eval", "inspect", "demo"):
            assert f"  {verb} " in out
