"""Provenance: a workdir's results belong to the settings that made them.

A changed result-affecting setting on a finished or partly done stage is refused
(exit 2, the fields named, config.json untouched); --rerun=STAGE discards that
stage and the ones after it; a moved workdir resumes; a failed start is fixed by
rerunning with the corrected value."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from cai_jax import pipeline, utils
from cai_jax.runtime import provenance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(workdir, *extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu", CAI_JAX_MALLOC_TUNABLES="0")
  env.pop("XLA_FLAGS", None)
  cmd = [sys.executable, "-m", "cai_jax.main", "--config=configs/tiny.py",
         f"--workdir={workdir}", "--config.stages=revise", "--config.compilation_cache=",
         "--config.revise.helpful_samples=0", "--config.data.num_red_team=2", *extra]
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_changed_settings_refused_rerun_moved_workdir_and_failed_start(tmp_path):
  w = tmp_path / "run"
  r = _cli(w, "--config.revise.num_revisions=1")
  assert r.returncode == 0, r.stderr[-2000:]
  config_before = (w / "config.json").read_bytes()
  snap = json.loads((w / "revise" / provenance.SNAPSHOT).read_text())
  assert snap["revise"]["num_revisions"] == 1 and "progress" not in snap["revise"]

  # A changed result-affecting setting on a finished stage: one line, exit 2, nothing rewritten.
  r = _cli(w, "--config.revise.num_revisions=2")
  assert r.returncode == 2
  err = [ln for ln in r.stderr.splitlines() if ln.startswith("cai-jax: error:")]
  assert len(err) == 1 and "revise.num_revisions: 1 -> 2" in err[0]
  assert "--rerun=revise" in err[0] and "fresh --workdir" in err[0]
  assert (w / "config.json").read_bytes() == config_before
  # A setting that does not change results is not refused.
  assert _cli(w, "--config.revise.num_revisions=1", "--config.revise.progress=false"
              ).returncode == 0

  # --rerun discards the stage and runs it with the new settings.
  r = _cli(w, "--config.revise.num_revisions=2", "--rerun=revise")
  assert r.returncode == 0, r.stderr[-2000:]
  snap = json.loads((w / "revise" / provenance.SNAPSHOT).read_text())
  assert snap["revise"]["num_revisions"] == 2
  assert json.loads((w / "config.json").read_text())["revise"]["num_revisions"] == 2
  recs = [json.loads(x) for x in (w / "revise" / "records.jsonl").read_text().splitlines()]
  assert all(len(rec["rounds"]) == 2 for rec in recs)

  # A moved workdir resumes: its snapshot names paths relative to it.
  moved = tmp_path / "moved"
  shutil.move(str(w), str(moved))
  r = _cli(moved, "--config.revise.num_revisions=2")
  assert r.returncode == 0, r.stderr[-2000:]
  assert "finished earlier" in r.stdout

  # A partly done stage is refused too.
  os.remove(moved / "revise" / "DONE")
  r = _cli(moved, "--config.revise.num_revisions=2", "--config.seed=7")
  assert r.returncode == 2 and "revise stage started with other settings" in r.stderr
  assert "seed: 0 -> 7" in r.stderr

  # A start that fails on a bad input never blocks its own fix.
  bad = tmp_path / "broken_model"
  bad.mkdir()
  (bad / "config.json").write_text("{not json")
  f = tmp_path / "fix"
  r = _cli(f, f"--config.model={bad}")
  assert r.returncode == 2 and "config.json" in r.stderr, r.stderr[-2000:]
  assert not (f / "revise" / provenance.SNAPSHOT).exists()
  r = _cli(f)
  assert r.returncode == 0, r.stderr[-2000:]
  assert _cli(tmp_path / "d", "--config.dtype=float17").returncode == 2


class _Fake:

  def __init__(self):
    self.calls = []

  def registry(self):
    def make(name):
      def run(config, workdir):
        self.calls.append(name)
        utils.mark_done(os.path.join(workdir, name), {"n": 1})
        return {"n": 1}
      return run
    return {n: make(n) for n in pipeline.STAGES}


def test_rerun_discards_the_stage_and_those_after_it(tmp_path):
  c = pipeline.base_config()
  c.compilation_cache = ""
  fake = _Fake()
  pipeline.run(c, str(tmp_path), registry=fake.registry(), write_report=False)
  assert fake.calls == list(pipeline.DEFAULT_STAGES)
  (tmp_path / "pm" / "extra.txt").write_text("stale")
  fake.calls = []
  pipeline.run(c, str(tmp_path), registry=fake.registry(), write_report=False, rerun="label")
  assert fake.calls == ["label", "pm", "ppo", "evaluate"]
  assert not (tmp_path / "pm" / "extra.txt").exists()
  with pytest.raises(utils.InputError, match="--rerun=bogus: unknown stage"):
    pipeline.run(c, str(tmp_path), registry=fake.registry(), rerun="bogus")


def test_settings_name_workdir_paths_relatively(tmp_path):
  c = pipeline.base_config()
  c.pm.preferences = str(tmp_path / "label" / "preferences.jsonl")
  from cai_jax.stages import preference
  s = preference.settings(c, str(tmp_path))
  assert s["pm"]["preferences"] == "$WORKDIR/label/preferences.jsonl"
  assert provenance.differences(s, preference.settings(c, str(tmp_path))) == []
  c.pm.batch_size = 16
  assert [d[0] for d in provenance.differences(s, preference.settings(c, str(tmp_path)))] == \
      ["pm.batch_size"]


def _leaves(d, prefix=""):
  for k, v in d.items():
    if hasattr(v, "items"):
      yield from _leaves(v, f"{prefix}{k}.")
    else:
      yield prefix + k, v


def _changed(v):
  if isinstance(v, bool):
    return not v
  if isinstance(v, int):
    return v + 3
  if isinstance(v, float):
    return v * 2 + 0.125
  if isinstance(v, str):
    return v + "_other"
  if isinstance(v, tuple):
    return v + ("other",)
  return "other"


OTHER = {"constitution": "traits"}  # values that must name something that exists


def _set(c, dotted, value):
  *path, last = dotted.split(".")
  node = c
  for k in path:
    node = node[k]
  with node.ignore_type():
    node[last] = value


@pytest.mark.parametrize("stage", [s for s in pipeline.STAGES])
def test_every_setting_of_every_stage_is_checked_on_resume(stage, tmp_path):
  """Each stage's recorded settings hold every field of its section but the volatile
  ones (and the top-level fields it uses): changing any of them on a started stage
  is refused before anything runs; changing a volatile one is not."""
  mod = pipeline._stage_module(stage)
  c0 = pipeline.base_config()
  w = str(tmp_path)
  os.makedirs(os.path.join(w, stage))
  utils.write_json(os.path.join(w, stage, provenance.SNAPSHOT), mod.settings(c0, w))
  # A stage may also leave out fields that change nothing under this config (ppo.online's
  # while refreshing is off).
  volatile = set(mod.volatile(c0) if hasattr(mod, "volatile") else mod.VOLATILE)
  fields = [f"{stage}.{k}" for k, _ in _leaves(c0[stage])
            if not any(k == v or k.startswith(v + ".") for v in volatile)]
  for k in mod.USES:
    fields += [f"{k}.{f}" for f, _ in _leaves(c0[k])] if hasattr(c0[k], "items") else [k]
  assert len(fields) > 5
  for field in fields:
    c1 = pipeline.base_config()
    c1.unlock()
    _set(c1, field, OTHER.get(field) or _changed(functools_get(c0, field)))
    with pytest.raises(utils.InputError, match=f"the {stage} stage started with other "
                       f"settings \\({field.replace('.', '[.]')}"):
      pipeline.check_settings(c1, w, [stage])
  for field in volatile:
    c1 = pipeline.base_config()
    c1.unlock()
    _set(c1, f"{stage}.{field}", _changed(functools_get(c0, f"{stage}.{field}")))
    pipeline.check_settings(c1, w, [stage])


def functools_get(c, dotted):
  import functools
  return functools.reduce(lambda d, k: d[k], dotted.split("."), c)


def test_a_snapshot_from_before_a_field_existed_matches_its_default(tmp_path):
  """A ppo stage recorded before ppo.algorithm (and the other RL-variant fields)
  existed resumes when they hold the value it ran with, and is refused otherwise."""
  from cai_jax.stages import ppo
  c0 = pipeline.base_config()
  w = str(tmp_path)
  os.makedirs(os.path.join(w, "ppo"))
  old = ppo.settings(c0, w)
  for k in ("algorithm", "reward", "group_size", "group_std", "kl_in"):
    del old["ppo"][k]
  utils.write_json(os.path.join(w, "ppo", provenance.SNAPSHOT), old)
  pipeline.check_settings(c0, w, ["ppo"])
  c1 = pipeline.base_config()
  c1.ppo.algorithm = "grpo"
  with pytest.raises(utils.InputError, match="ppo.algorithm: <unset> -> grpo"):
    pipeline.check_settings(c1, w, ["ppo"])
