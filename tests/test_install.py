"""cbdtune installs as a wheel: the search spaces ship inside it and every command has a usage line
and ``--version`` that do not depend on a checkout."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

import cbdtune

REPO = Path(__file__).resolve().parent.parent


def _run(cmd: list[str | Path], cwd: Path) -> subprocess.CompletedProcess[str]:
    # No PYTHONPATH and no checkout as cwd: only the installed wheel can provide cbdtune.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding the wheel built from this checkout; returns its ``bin`` folder."""
    tmp = tmp_path_factory.mktemp("install")
    # Build from a copy: an in-tree build would leave build/ and *.egg-info in the checkout.
    src = tmp / "src"
    shutil.copytree(REPO / "cbdtune", src / "cbdtune",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    # Offline: setuptools comes from this venv (--no-build-isolation), no dependency is fetched.
    build = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                  "--no-index", "-q", "-w", tmp / "dist", src], cwd=tmp)
    assert build.returncode == 0, build.stderr
    [wheel] = (tmp / "dist").glob("cbdtune-*.whl")
    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=False)
    # The dependencies (torch, ray, ...) come from this test venv through a .pth file, listed
    # after the new venv's own site-packages. (--system-site-packages would not do: from a venv
    # it exposes the base interpreter's site-packages, not this venv's.) Plain path lines do not
    # run this venv's .pth files, so its editable install of the checkout stays out.
    new_site = next((env_dir / "lib").glob("python3*/site-packages"))
    (new_site / "_test_venv.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    python = env_dir / "bin" / "python"
    install = _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps",
                    "--no-index", "-q", wheel], cwd=tmp)
    assert install.returncode == 0, install.stderr
    return env_dir / "bin"


@pytest.mark.slow
def test_install_wheel_ships_the_search_spaces(installed: Path, tmp_path: Path) -> None:
    code = ("import cbdtune, cbdtune.space as s; sp = s.load_space('default'); "
            "print(cbdtune.__file__); print(sp.path); print(' '.join(s.shipped_spaces()))")
    proc = _run([installed / "python", "-c", code], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    module, space_path, names = proc.stdout.splitlines()
    venv_dir = str(installed.parent)
    assert module.startswith(venv_dir), f"cbdtune imported from {module}, not the wheel"
    assert space_path.startswith(venv_dir) and space_path.endswith("default.yaml")
    assert set(names.split()) >= {"default", "paper", "smoke"}


@pytest.mark.slow
def test_install_wheel_ships_py_typed(installed: Path) -> None:
    # PEP 561: without the marker, a type checker in a user's project ignores cbdtune's hints.
    [site_packages] = (installed.parent / "lib").glob("python3*/site-packages")
    assert (site_packages / "cbdtune" / "py.typed").is_file(), "py.typed is not in the wheel"


@pytest.mark.slow
def test_install_console_scripts_have_usage_and_version(installed: Path, tmp_path: Path) -> None:
    for script in ("cbdtune-search", "cbdtune-train", "cbdtune-data", "cbdtune-predict"):
        assert (installed / script).is_file(), f"{script} was not installed"
    help_ = _run([installed / "cbdtune-search", "--help"], cwd=tmp_path)
    assert help_.returncode == 0, help_.stderr
    assert help_.stdout.startswith("usage: cbdtune-search [-h] [--version]")
    for script in ("cbdtune-search", "cbdtune-data"):
        version = _run([installed / script, "--version"], cwd=tmp_path)
        assert version.returncode == 0, version.stderr
        assert version.stdout.strip() == f"cbdtune {cbdtune.__version__}"
