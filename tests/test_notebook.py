"""notebooks/evaluate_colab.ipynb: every code cell runs on CPU (smoke mode), so it cannot rot."""

from __future__ import annotations

import json
import os
import sys
import tomllib

import numpy as np
import pytest
from fixtures.tiny_checkpoint import shared_tiny_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "evaluate_colab.ipynb")


def code_cells() -> list[str]:
    with open(NOTEBOOK) as f:
        notebook = json.load(f)
    return ["".join(cell["source"]) for cell in notebook["cells"] if cell["cell_type"] == "code"]


def test_notebook_cells_are_plain_python():
    for i, source in enumerate(code_cells()):
        compile(source, f"cell {i}", "exec")  # no shell magics: the cells also run outside IPython
        assert not any(line.lstrip().startswith(("!", "%")) for line in source.splitlines())


def install_cell(monkeypatch) -> dict:
    """The namespace of the notebook's install cell, run in smoke mode (nothing installed)."""
    monkeypatch.setenv("LAUD_NOTEBOOK_SMOKE", "1")
    monkeypatch.delenv("LAUD_NOTEBOOK_EXTRA", raising=False)
    cells = code_cells()
    [source] = [c for c in cells if "def gpu_extra" in c]
    namespace: dict = {"__name__": "__main__"}
    exec(compile(cells[0], "cell 0", "exec"), namespace)
    exec(compile(source, "install cell", "exec"), namespace)
    return namespace


NVIDIA_SMI = """+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI {driver}              Driver Version: {driver}      CUDA Version: {cuda}     |
|-----------------------------------------+------------------------+----------------------+
| GPU  Name                 Persistence-M | Bus-Id          Disp.A | Volatile Uncorr. ECC |
|   0  Tesla T4                       Off |   00000000:00:04.0 Off |                    0 |
+-----------------------------------------------------------------------------------------+
"""


def test_install_extra_follows_the_driver(monkeypatch):
    gpu_extra = install_cell(monkeypatch)["gpu_extra"]
    assert gpu_extra(NVIDIA_SMI.format(driver="580.82.07", cuda="13.0")) == "gpu"
    assert gpu_extra(NVIDIA_SMI.format(driver="590.44.01", cuda="13.1")) == "gpu"
    assert gpu_extra(NVIDIA_SMI.format(driver="550.54.15", cuda="12.4")) == "gpu-cuda12"  # Colab's
    assert gpu_extra(NVIDIA_SMI.format(driver="525.60.13", cuda="12.0")) == "gpu-cuda12"
    assert gpu_extra(NVIDIA_SMI.format(driver="560.35.03", cuda="N/A")) == "gpu-cuda12"  # from the driver
    assert gpu_extra(NVIDIA_SMI.format(driver="580.65.06", cuda="N/A")) == "gpu"
    assert gpu_extra(None) == "cpu"  # no NVIDIA driver
    for too_old in (
        NVIDIA_SMI.format(driver="470.82.01", cuda="11.4"),
        NVIDIA_SMI.format(driver="470.82.01", cuda="N/A"),
    ):
        with pytest.raises(SystemExit, match=r"too old for JAX 0\.12.*CUDA 12 \(driver r525.*CUDA 13"):
            gpu_extra(too_old)
    with pytest.raises(SystemExit, match="LAUD_NOTEBOOK_EXTRA"):
        gpu_extra("NVIDIA-SMI has an unexpected format")


def fake_nvidia_smi(directory, report, status=0):
    script = directory / "nvidia-smi"
    script.write_text(f"#!{sys.executable}\nimport sys\nsys.stdout.write({report!r})\nsys.exit({status})\n")
    script.chmod(0o755)


def test_install_cell_reads_nvidia_smi(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # only the fake nvidia-smi (or nothing) on PATH
    namespace = install_cell(monkeypatch)
    assert namespace["EXTRA"] == "cpu" and "extra for this machine: cpu" in capsys.readouterr().out
    fake_nvidia_smi(tmp_path, NVIDIA_SMI.format(driver="550.54.15", cuda="12.4"))
    assert install_cell(monkeypatch)["EXTRA"] == "gpu-cuda12"
    fake_nvidia_smi(tmp_path, "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n", 9)
    with pytest.raises(SystemExit, match="nvidia-smi failed .*couldn't communicate"):
        install_cell(monkeypatch)
    monkeypatch.setenv("LAUD_NOTEBOOK_EXTRA", "gpu")  # the user's choice wins (nvidia-smi not run)
    namespace = {"__name__": "__main__"}
    for source in code_cells()[:2]:
        exec(compile(source, "cell", "exec"), namespace)
    assert namespace["EXTRA"] == "gpu"


def test_extras_offer_both_cuda_majors_for_the_same_jax():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    assert extras["gpu"][0].startswith("jax[cuda13]==") and extras["gpu-cuda12"][0].startswith("jax[cuda12]==")
    assert extras["gpu"][0].split("==")[1] == extras["gpu-cuda12"][0].split("==")[1]
    assert extras["gpu"][1:] == extras["gpu-cuda12"][1:]


def test_notebook_runs_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("LAUD_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("LAUD_NOTEBOOK_OUT", str(tmp_path))
    monkeypatch.setenv("LAUD_NOTEBOOK_CHECKPOINT", shared_tiny_checkpoint())
    monkeypatch.chdir(ROOT)
    namespace: dict = {"__name__": "__main__"}
    for i, source in enumerate(code_cells()):
        exec(compile(source, f"{NOTEBOOK} cell {i}", "exec"), namespace)
    assert namespace["logits"].shape == (2, 7)  # the converted LAUDNet fixture
    assert os.path.isfile(os.path.join(tmp_path, "converted", "config.json"))
    result = namespace["result"]
    assert result["examples"] == 200 and "predicted" in result
    assert [row["backend"] for row in namespace["bench"]] == ["xla"]
    assert all(row["max_logit_difference"] < 1e-3 for row in namespace["bench"])
    picture = namespace["picture"]
    assert os.path.getsize(picture["path"]) > 1000 and np.all(picture["densities"] > 0)
