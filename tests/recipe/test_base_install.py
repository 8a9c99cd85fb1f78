"""`pip install .` without extras gives a working `spo validate` and installs no torch (a real fresh venv)."""

from __future__ import annotations

import os
import shutil
import subprocess
import venv
from pathlib import Path

import pytest
from recipe_paths import REPO


@pytest.mark.slow
def test_fresh_venv_base_install_validates_recipes_without_torch(tmp_path: Path) -> None:
    source = tmp_path / "src-copy"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, source / name)
    shutil.copytree(
        REPO / "src" / "spo_align", source / "src" / "spo_align", ignore=shutil.ignore_patterns("__pycache__")
    )
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, system_site_packages=False, clear=True).create(env_dir)
    bindir = env_dir / ("Scripts" if os.name == "nt" else "bin")
    python = bindir / "python"
    clean_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(source)],
        capture_output=True, text=True, check=False, timeout=600, env=clean_env,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    listing = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True, check=False, env=clean_env
    ).stdout.lower()
    for heavy in ("torch", "transformers", "trl", "deepspeed", "datasets"):
        assert not any(line.startswith(heavy + "==") for line in listing.splitlines()), listing
    run = subprocess.run(
        [str(bindir / "spo"), "validate", "recipes", "spo_recipes"],
        capture_output=True, text=True, check=False, timeout=300, cwd=REPO, env=clean_env,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "recipe(s) valid" in run.stderr
    broken = subprocess.run(
        [str(bindir / "spo"), "validate", str(REPO / "tests" / "data" / "broken_recipes")],
        capture_output=True, text=True, check=False, timeout=300, cwd=REPO, env=clean_env,
    )
    assert broken.returncode == 1 and "Traceback" not in broken.stdout + broken.stderr
