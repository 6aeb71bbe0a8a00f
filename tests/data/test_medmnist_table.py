"""medfed's copy of the MedMNIST 2D metadata equals the installed ``medmnist.INFO``, and
neither the config check nor a site's worker imports the medmnist package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import medmnist

from medfed import _medmnist_info as table

REPO = Path(__file__).resolve().parents[2]


def test_table_equals_the_installed_medmnist_info():
    # Prepare
    expected = {flag: {key: meta[key] for key in table.KEYS if key in meta}
                for flag, meta in medmnist.INFO.items() if "3d" not in flag}
    # Execute / Assert
    assert table.INFO_2D == expected
    assert table.FLAGS_3D == tuple(flag for flag in medmnist.INFO if "3d" in flag)
    assert table.MEDMNIST_VERSION == medmnist.__version__
    assert all({"task", "label", "n_channels", "url", "MD5"} <= set(meta) for meta in table.INFO_2D.values())


def test_regenerating_the_table_gives_the_committed_file():
    # Execute
    source = table._generate()
    # Assert
    assert source == Path(table.__file__).read_text(encoding="utf-8")


def _modules_after_import(module: str) -> set[str]:
    # A fresh interpreter, so that modules imported by other tests do not count.
    code = f"import sys, {module}; print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    return set(done.stdout.split())


def test_config_imports_neither_torch_nor_medmnist():
    # Execute
    loaded = _modules_after_import("medfed.config")
    # Assert
    assert "medfed" in loaded
    assert not loaded & {"torch", "medmnist"}


def test_the_client_app_does_not_import_medmnist():
    # Execute
    loaded = _modules_after_import("medfed.client.client_app")
    # Assert
    assert "flwr" in loaded and "torch" in loaded
    assert "medmnist" not in loaded
