"""Pipeline: stage order, DONE skipping, resume after an interruption, timings, reuse."""
import json
import os
import signal

import pytest

from cai_jax import interrupts, pipeline, utils
from cai_jax.utils import InputError


class FakeStages:
  """Stage functions that log their calls; `interrupt` makes one stage fail once
  after writing partial output, as a killed process would leave it."""

  def __init__(self, interrupt=None):
    self.calls = []
    self.interrupt = interrupt

  def make(self, name):
    def run(config, workdir):
      d = os.path.join(workdir, name)
      os.makedirs(d, exist_ok=True)
      partial = os.path.join(d, "partial.txt")
      resumed = os.path.exists(partial)
      self.calls.append((name, resumed))
      with open(partial, "a") as f:
        f.write("x")
      if self.interrupt == name and not resumed:
        raise interrupts.Interrupted(signal.SIGTERM, name)  # what a stage raises on SIGTERM
      if name != "pm":  # pm relies on the pipeline writing DONE
        utils.mark_done(d, {"items": 3, "resumed": resumed})
      return {"items": 3, "resumed": resumed}
    return run

  def registry(self):
    return {name: self.make(name) for name in pipeline.STAGES}


def _config(**kw):
  c = pipeline.base_config()
  c.compilation_cache = ""  # keep the test process's JAX configuration untouched
  for k, v in kw.items():
    setattr(c, k, v)
  return c


def test_runs_in_canonical_order_and_skips_done(tmp_path):
  fake = FakeStages()
  c = _config(stages=("evaluate", "revise", "sft"))
  out = pipeline.run(c, str(tmp_path), registry=fake.registry(), write_report=False)
  assert [n for n, _ in fake.calls] == ["revise", "sft", "evaluate"]
  assert out["sft"]["summary"] == {"items": 3, "resumed": False}
  fake2 = FakeStages()
  c.stages = pipeline.DEFAULT_STAGES
  out = pipeline.run(c, str(tmp_path), registry=fake2.registry(), write_report=False)
  assert [n for n, _ in fake2.calls] == ["label", "pm", "ppo"]
  assert out["revise"] == {"status": "skipped"}
  # The pipeline writes DONE for a stage that returned without one.
  assert json.load(open(tmp_path / "pm" / "DONE"))["items"] == 3
  t = pipeline.read_timings(str(tmp_path))
  assert set(t["stages"]) == set(pipeline.DEFAULT_STAGES)
  assert t["stages"]["revise"]["attempts"] == 1 and t["stages"]["revise"]["seconds"] >= 0


def test_interrupted_stage_resumes_without_redoing_finished(tmp_path):
  fake = FakeStages(interrupt="label")
  c = _config()
  with pytest.raises(interrupts.Interrupted):
    pipeline.run(c, str(tmp_path), registry=fake.registry(), write_report=False)
  assert fake.calls == [("revise", False), ("sft", False), ("label", False)]
  assert not utils.is_done(str(tmp_path / "label"))
  t = pipeline.read_timings(str(tmp_path))
  assert t["stages"]["label"]["status"] == "interrupted"
  again = FakeStages(interrupt="label")
  pipeline.run(c, str(tmp_path), registry=again.registry(), write_report=False)
  # Finished stages are not called again; the interrupted one resumes its output.
  assert again.calls == [("label", True), ("pm", False), ("ppo", False), ("evaluate", False)]
  t = pipeline.read_timings(str(tmp_path))
  assert t["stages"]["label"]["attempts"] == 2 and t["stages"]["label"]["status"] == "done"


def test_reuse_links_finished_stages(tmp_path):
  base = tmp_path / "base"
  pipeline.run(_config(stages=("revise", "sft")), str(base), registry=FakeStages().registry(),
               write_report=False)
  fake = FakeStages()
  c = _config(stages=("revise", "sft", "label"), reuse_from=str(base),
              reuse_stages=("revise", "sft"))
  pipeline.run(c, str(tmp_path / "ablation"), registry=fake.registry(), write_report=False)
  assert [n for n, _ in fake.calls] == ["label"]
  assert os.path.islink(tmp_path / "ablation" / "revise")
  with pytest.raises(InputError, match="no DONE marker"):
    pipeline.run(_config(stages=("label",), reuse_from=str(base), reuse_stages=("label",)),
                 str(tmp_path / "x"), registry=fake.registry(), write_report=False)


@pytest.mark.parametrize("field,value,match", [
    ("stages", ("revise", "critique"), "unknown stage 'critique'"),
    ("stages", ("revise,critique",), "unknown stage 'critique'"),
    ("stages", (), "config.stages is empty"),
    ("model", "/no/such/model", "config.model: /no/such/model: not found"),
    ("model", "", "config.model is empty"),
    ("feedback_model", "/no/such.gguf", "config.feedback_model"),
    ("prompt_format", "markdown", "prompt_format"),
    ("reuse_stages", ("sft",), "reuse_from is empty"),
])
def test_validate_rejects_bad_config(field, value, match, tmp_path):
  c = _config(**{field: value})
  with pytest.raises(InputError, match=match):
    pipeline.run(c, str(tmp_path), registry=FakeStages().registry(), write_report=False)
  assert not os.path.exists(tmp_path / "revise")


def test_base_config_is_locked():
  c = pipeline.base_config()
  with pytest.raises(AttributeError):
    c.data.num_red_tem = 3
  assert pipeline.parse_stages(("ppo", "revise")) == ["revise", "ppo"]


@pytest.mark.slow
def test_tiny_pipeline_end_to_end_with_kill_and_resume(tmp_path):
  """configs/tiny.py through every stage as `make demo` runs it: killed with SIGKILL
  once the first stage has finished, then re-run; finished stages are not redone."""
  import signal
  import subprocess
  import sys
  import time
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  w = tmp_path / "tiny"
  cmd = [sys.executable, "-m", "cai_jax.main", "--config=configs/tiny.py", f"--workdir={w}",
         f"--config.compilation_cache={tmp_path / 'xla'}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # one device, as a user runs it
  p = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  # Generous limits: on an idle 2-core machine the whole run takes ~2 minutes.
  deadline = time.time() + 1500
  while not utils.is_done(str(w / "revise")) and p.poll() is None and time.time() < deadline:
    time.sleep(0.5)
  assert p.poll() is None, p.stdout.read().decode()[-3000:]
  time.sleep(2.0)  # into the next stage
  p.send_signal(signal.SIGKILL)
  p.wait()
  revise_done = os.path.getmtime(w / "revise" / "DONE")
  r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=2400)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  t = pipeline.read_timings(str(w))
  for s in pipeline.DEFAULT_STAGES:
    assert utils.is_done(str(w / s)), s
    assert t["stages"][s]["status"] in ("done", "skipped")
  assert t["stages"]["revise"]["attempts"] == 1  # not redone after the kill
  assert os.path.getmtime(w / "revise" / "DONE") == revise_done
  assert "Report: " in r.stdout and (w / "report.md").exists()
  text = (w / "report.md").read_text()
  for heading in ("## Did it work?", "## Summary", "## SL-CAI: critiques and revisions",
                  "## AI feedback labels", "## Preference model", "## RL-CAI (PPO)",
                  "### Scores by the held-out judge", "### Scores by the in-loop PM",
                  "### Elo by the feedback model (in-loop)", "### Evasiveness",
                  "### Sanity panel"):
    assert heading in text, heading
