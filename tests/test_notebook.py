"""notebooks/evaluate_colab.ipynb: every code cell runs on CPU (smoke mode), so it cannot rot."""

from __future__ import annotations

import json
import os

import numpy as np

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


def test_notebook_runs_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("LAUD_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("LAUD_NOTEBOOK_OUT", str(tmp_path))
    monkeypatch.setenv("LAUD_NOTEBOOK_CHECKPOINT", shared_tiny_checkpoint())
    monkeypatch.chdir(ROOT)
    namespace: dict = {"__name__": "__main__"}
    for i, source in enumerate(code_cells()):
        exec(compile(source, f"{NOTEBOOK} cell {i}", "exec"), namespace)  # noqa: S102
    assert namespace["logits"].shape == (2, 7)  # the converted LAUDNet fixture
    assert os.path.isfile(os.path.join(tmp_path, "converted", "config.json"))
    result = namespace["result"]
    assert result["examples"] == 200 and "predicted" in result
    assert [row["backend"] for row in namespace["bench"]] == ["xla"]
    assert all(row["max_logit_difference"] < 1e-3 for row in namespace["bench"])
    picture = namespace["picture"]
    assert os.path.getsize(picture["path"]) > 1000 and np.all(picture["densities"] > 0)
