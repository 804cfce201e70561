"""Multi-axis constitutional feedback through the tiny pipeline: per-axis labels, a
PM head per axis and the weighted, standardised RL reward; and a constitution's
axes change nothing for a run that does not use them."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cai_jax import constitution, models, utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(workdir, *flags, stages="label,pm,ppo"):
  cmd = [sys.executable, "-m", "cai_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}",
         f"--config.stages={stages}", *flags]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


@pytest.mark.slow
def test_tiny_pipeline_per_axis_and_unchanged_without(tmp_path):
  plain = tmp_path / "plain.json"
  const = constitution.load("harmlessness")
  dataclasses.replace(const, axes=()).save(str(plain))
  # PPO reads the PM, not the constitution: equal PMs give equal RL runs.
  _run(tmp_path / "with_axes", stages="label,pm")
  _run(tmp_path / "without_axes", f"--config.constitution={plain}", stages="label,pm")
  for f in ("label/preferences.jsonl", "pm/metrics.jsonl"):
    a = [json.loads(x) for x in open(tmp_path / "with_axes" / f)]
    b = [json.loads(x) for x in open(tmp_path / "without_axes" / f)]
    strip = lambda rs: [{k: v for k, v in r.items()  # noqa: E731
                         if not k.startswith(("time", "tokens_per", "mfu", "steps_per"))}
                        for r in rs]
    assert strip(a) == strip(b), f
  _, pa = models.load_pretrained(str(tmp_path / "with_axes" / "pm" / "final"))
  _, pb = models.load_pretrained(str(tmp_path / "without_axes" / "pm" / "final"))
  np.testing.assert_array_equal(pa["score_kernel"], pb["score_kernel"])

  w = tmp_path / "per_axis"
  # With online refresh: each refresh labels per axis and trains every head.
  _run(w, "--config.label.per_axis=True", "--config.pm.per_axis_heads=True",
       "--config.ppo.axis_weights=harm:1,helpfulness:0.5", "--config.ppo.online.refresh_every=1")
  names = const.axis_names
  recs = list(utils.read_jsonl(str(w / "label" / "preferences.jsonl")))
  assert recs and all(list(r["axes"]) == names for r in recs)
  cfg, params = models.load_pretrained(str(w / "pm" / "final"))
  assert cfg.score_labels == tuple(names) and params["score_kernel"].shape[-1] == len(names)
  rows = list(utils.read_jsonl(str(w / "ppo" / "metrics.jsonl")))
  assert rows and all(f"score_{n}" in r for r in rows for n in names)
  # Two iterations: one refresh, after the first; its labels carry every axis.
  assert [r.get("online/refresh") for r in rows] == [1, None]
  assert all(f"online/before_loss_{n}" in rows[0] for n in names)
  fresh = list(utils.read_jsonl(str(w / "ppo" / "online_labels.jsonl")))
  assert len(fresh) == 4 and all(list(r["axes"]) == names for r in fresh)
  pm_cfg, _ = models.load_pretrained(str(w / "ppo" / "pm_final"))
  assert pm_cfg.score_labels == tuple(names)


@pytest.mark.parametrize("module", ["tiny", "demo"])
def test_axes_sweep_points_are_valid_configs(module):
  """--sweep=axes: a scalar PM and two per-axis weightings on shared per-axis labels;
  every point is a config that validates (fields exist, weights name real axes)."""
  import importlib.util
  from cai_jax import pipeline
  from cai_jax.rl import control
  from cai_jax.runtime import checks
  from cai_jax.tools.config_file import override
  spec = importlib.util.spec_from_file_location("m", os.path.join(ROOT, "configs", f"{module}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  points = []
  mod.sweep_axes(lambda **kw: points.append(kw))
  assert [p.get("pm.per_axis_heads", False) for p in points] == [False, True, True]
  assert all(p["label.per_axis"] for p in points)
  names = constitution.load("harmlessness").axis_names
  for p in points:
    c = override(mod.get_config(), p)
    checks.check(c, pipeline.parse_stages(c.stages))  # fields and values (not the mesh)
    control.parse_axis_weights(c.ppo.axis_weights, names)
  assert points[1]["reuse_stages"] == points[2]["reuse_stages"] == ("revise", "sft", "label")
