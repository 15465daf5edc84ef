"""The notebooks run top to bottom with their default (tiny) parameters, and are stored without outputs.

Each notebook is executed by nbclient in a Jupyter kernel on this interpreter (a kernelspec written to a
temporary JUPYTER_PATH), with one CPU device, no network, and W2V2_NOTEBOOK_DIR pointing at a temporary
folder shared by the three, so 02 reuses the corpus and pretraining run of 01 as a user's session
would (02 also runs on its own: it then makes a smaller version of both). The last cell of each
notebook prints a JSON line of key figures, which the tests check.
"""
import json
import math
import os
import re
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(ROOT, "notebooks")
NOTEBOOKS = ("01_pretrain.ipynb", "02_finetune_and_transcribe.ipynb", "03_hf_checkpoints.ipynb")
KERNEL = "w2v2-jax-notebook-tests"
CELL_TIMEOUT = 600


def read(name):
  return nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)


@pytest.fixture(scope="module")
def session(tmp_path_factory):
  """(working folder shared by the notebooks, kernel name): the kernel runs sys.executable with this
  checkout first on its path, on one CPU device, offline."""
  base = tmp_path_factory.mktemp("notebooks")
  spec_dir = base / "jupyter" / "kernels" / KERNEL
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "w2v2_jax tests", "language": "python"}))
  work = base / "work"
  work.mkdir()
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("JUPYTER_PATH", str(base / "jupyter"))
    mp.setenv("JUPYTER_PLATFORM_DIRS", "1")
    mp.setenv("W2V2_NOTEBOOK_DIR", str(work))
    mp.setenv("JAX_PLATFORMS", "cpu")
    # conftest.py asks for 8 fake CPU devices; a notebook user has one.
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", "")).strip()
    if flags:
      mp.setenv("XLA_FLAGS", flags)
    else:
      mp.delenv("XLA_FLAGS", raising=False)
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("TRANSFORMERS_OFFLINE", "1")
    mp.setenv("PYTHONPATH", os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    yield work, KERNEL


def execute(name, work, kernel):
  """Runs the notebook in `work`; returns (executed notebook, the summary dict of its last cell)."""
  nb = read(name)
  client = nbclient.NotebookClient(nb, kernel_name=kernel, timeout=CELL_TIMEOUT, allow_errors=False,
                                   resources={"metadata": {"path": str(work)}})
  client.execute()
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") == "error"]
  assert not errors, errors
  last = [c for c in nb.cells if c.cell_type == "code"][-1]
  text = "".join(o.get("text", "") for o in last.outputs
                 if o.get("output_type") == "stream" and o.get("name") == "stdout")
  summaries = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
  assert summaries, f"{name}: the last cell printed no JSON summary: {text!r}"
  summary = summaries[-1]
  assert summary["notebook"] == name[:-len(".ipynb")]
  return nb, summary


def finite(*values):
  return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, session):
  work, kernel = session
  pretrained_by_01 = os.path.join(str(work), "pretrain")
  had_01 = os.path.isdir(os.path.join(pretrained_by_01, "checkpoints"))   # when 01 ran first
  nb, summary = execute(name, work, kernel)
  if name.startswith("01"):
    params = nb.cells[[i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])][0]]
    steps = int(re.search(r"^PRETRAIN_STEPS = (\d+)", params.source, re.M).group(1))
    assert summary["steps"] == steps
    assert finite(summary["contrastive_first"], summary["contrastive_last"], summary["accuracy_last"],
                  summary["prob_perplexity_last"])
    # The run learns: the loss leaves its chance level, and the codebook does not collapse.
    assert summary["left_chance_at"] is not None, summary
    assert summary["contrastive_last"] < summary["chance"] - 0.1, summary
    assert summary["prob_perplexity_last"] > 4 * summary["latent_groups"], summary
    assert os.path.isfile(os.path.join(work, "corpus", "test.tsv"))
  elif name.startswith("02"):
    if had_01:
      assert summary["pretrained"] == pretrained_by_01                      # notebook 01's run, reused
    assert finite(summary["test_wer"], summary["test_cer"], summary["train_loss_first"], summary["train_loss_last"])
    assert summary["test_utterances"] > 0
    assert summary["train_loss_last"] < summary["train_loss_first"]
    for key in ("reference", "transcript", "greedy", "beam"):
      assert isinstance(summary[key], str), (key, summary)
    assert summary["reference"]
    assert os.path.isfile(os.path.join(summary["run"], "export", "model.safetensors"))
  else:
    assert summary["hf_model"] is None                                    # offline: the random tiny model
    assert summary["max_abs_diff"] < 1e-3
    assert summary["recognizer_max_abs_diff"] < 1e-3
    assert summary["roundtrip_max_abs_diff"] < 1e-3
    assert isinstance(summary["transcript"], str)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_stored_clean(name):
  """Stored without outputs or execution counts, a python3 kernelspec, the install cell first and a
  cell tagged "parameters" (papermill-style) near the top."""
  nb = read(name)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  for cell in code:
    assert cell.outputs == [], cell.source[:80]
    assert cell.execution_count is None, cell.source[:80]
  assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
  assert "import w2v2_jax" in code[0].source and "except ImportError" in code[0].source
  tagged = [i for i, c in enumerate(code) if "parameters" in c.metadata.get("tags", [])]
  assert tagged == [1], tagged
  assert "W2V2_NOTEBOOK_DIR" in code[1].source
