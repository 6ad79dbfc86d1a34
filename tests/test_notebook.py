"""notebooks/colab.ipynb run headless in a temporary copy of the project with the tiny settings of the workflow
tests: every cell but the Colab-only ones (Drive, GPU) must run, build the quantized GGUF and print samples."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from test_workflow import ROOT, TARGET, copy_project  # noqa: E402

NOTEBOOK = ROOT / "notebooks" / "colab.ipynb"
COLAB_ONLY = "# colab-only:"
PROMPT = "Once upon a time"


def code_cells(notebook) -> list:
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def output_text(cell) -> str:
    return "".join(out.get("text", "") for out in cell.outputs if out.output_type == "stream")


def test_only_the_drive_gpu_and_tensorboard_cells_are_colab_only():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    markers = [cell.source.splitlines()[0] for cell in code_cells(notebook) if COLAB_ONLY in cell.source]
    assert markers == ["# colab-only: drive", "# colab-only: gpu", "# colab-only: tensorboard"]
    assert notebook.metadata["accelerator"] == "GPU"


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """The notebook after a headless run in a tiny project, with one more cell whose command fails."""
    project = copy_project(tmp_path_factory.mktemp("colab"))
    (project / "notebooks").mkdir()
    # a context long enough for the notebook's 100-token llama.cpp completion (llama.cpp refuses to slide)
    config = yaml.safe_load((project / "config.yaml").read_text())
    config["model"]["block_size"] = 128
    (project / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    notebook.cells = [c for c in notebook.cells if not (c.cell_type == "code" and c.source.startswith(COLAB_ONLY))]
    failing = nbformat.v4.new_code_cell('run(sys.executable, "-c", "import sys; print(\'stage output\'); sys.exit(3)")')
    notebook.cells.append(failing)
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(project)}})
    with pytest.raises(nbclient.exceptions.CellExecutionError) as failure:
        client.execute()
    return project, notebook, failure.value


def test_notebook_builds_the_pipeline_and_prints_samples(executed):
    project, notebook, _ = executed
    cells = code_cells(notebook)
    assert all(cell.execution_count for cell in cells), "every cell ran"
    assert not any(out.output_type == "error" for cell in cells[:-1] for out in cell.outputs)
    assert (project / TARGET).stat().st_size > 0
    assert (project / "report.html").stat().st_size > 0
    assert list(project.glob("checkpoints/runs/*/tensorboard/events.out.tfevents.*")), "the %tensorboard cell's files"
    pipeline, samples, gguf = (next(c for c in cells if marker in c.source)
                               for marker in ('"--report"', '"--checkpoint"', '"--gguf"'))
    assert "Finished jobid" in output_text(pipeline)  # Snakemake's log, streamed into the cell
    assert any("image/svg+xml" in out.get("data", {}) for out in pipeline.outputs), "the loss curve is shown"
    for cell in (samples, gguf):
        # what each command printed after its "$ command" line: the prompt and the model's continuation
        printed = re.split(r"^\$ .*$", output_text(cell), flags=re.MULTILINE)[1:]
        assert printed and all(p.strip().startswith(PROMPT) and len(p.strip()) > len(PROMPT) for p in printed), printed


def test_a_failing_command_fails_its_cell(executed):
    _, notebook, failure = executed
    failing = notebook.cells[-1]
    assert "stage output" in output_text(failing)  # streamed before the failure
    assert failure.ename == subprocess.CalledProcessError.__name__
    assert "returned non-zero exit status 3" in failure.evalue


def test_every_cell_has_an_id():
    """nbformat 4.5 wants one on every cell (a missing one is a warning today, an error in a later nbformat)."""
    raw = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    assert raw["nbformat"] == 4 and raw["nbformat_minor"] >= 5
    ids = [cell.get("id") for cell in raw["cells"]]
    assert all(ids) and len(set(ids)) == len(ids), ids


def test_the_drive_cell_merges_by_step_instead_of_copying_over(tmp_path, monkeypatch):
    """The Drive cell run as Colab runs it (google.colab faked): a younger local run does not replace Drive's."""
    import sys
    import types

    from test_colab import RUN, fake_run

    mount = types.ModuleType("google.colab.drive")
    mount.mount = lambda path: None
    colab = types.ModuleType("google.colab")
    colab.drive = mount
    monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.setitem(sys.modules, "google.colab.drive", mount)
    checkout, drive = tmp_path / "tinygpt", tmp_path / "MyDrive" / "tinygpt"
    fake_run(checkout, 10)
    fake_run(drive, 30)
    cell = next(c for c in code_cells(nbformat.read(NOTEBOOK, as_version=4)) if c.source.startswith("# colab-only: drive"))
    source = cell.source.replace('"/content/drive/MyDrive/tinygpt"', repr(str(drive)))
    monkeypatch.setattr(sys, "path", list(sys.path))  # the cell puts the checkout first
    exec(compile(source, "drive-cell", "exec"), {"sys": sys, "Path": Path, "checkout": checkout})
    assert (checkout / "checkpoints").is_symlink() and (checkout / "exports").is_symlink()
    assert torch.load(drive / "checkpoints" / RUN / "last.pt", weights_only=True)["step"] == 30
