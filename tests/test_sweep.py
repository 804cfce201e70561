"""`--sweep=revisions` on the tiny config: every point graded by one held-out judge, and
sweep.png drawn against the swept value."""
import json
import os
import subprocess
import sys

import matplotlib.image as mpimg
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_revisions_sweep_one_judge_swept_value_on_x(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", CAI_JAX_MALLOC_TUNABLES="0")
  env.pop("XLA_FLAGS", None)
  w = tmp_path / "sweep"
  r = subprocess.run([sys.executable, "-m", "cai_jax.main", "--config=configs/tiny.py",
                      f"--workdir={w}", "--sweep=revisions", "--config.compilation_cache=",
                      f"--config.evaluate.judge.cache_dir={tmp_path / 'judges'}",
                      "--config.evaluate.judges=pm"],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=2400)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  info = json.loads((w / "sweep.json").read_text())
  assert info["field"] == "revise.num_revisions" and info["values"] == [1, 3]
  assert len(info["judges"]) == 2 and len(set(info["judges"])) == 1 and info["judges"][0]
  for row in info["rows"]:
    assert row["judge"] == info["judges"][0] and row["rl_cai"] is not None
  # One judge trained, cached, reused by every point.
  assert len(os.listdir(tmp_path / "judges")) == 1
  text = (w / "sweep.md").read_text()
  assert "graded by the same held-out judge" in text and "sweep.png" in text
  img = mpimg.imread(str(w / "sweep.png"))
  assert img.shape[0] > 200 and img[..., :3].std() > 0.02


@pytest.mark.slow
def test_rl_sweep_runs_every_variant_from_one_sl_cai_model(tmp_path):
  """--sweep=rl on the tiny config: PPO, GRPO, RLOO, soft DPO and the direct AI reward
  end to end, the later points linking the first point's revise/sft/label/pm."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", CAI_JAX_MALLOC_TUNABLES="0")
  env.pop("XLA_FLAGS", None)
  w = tmp_path / "sweep"
  r = subprocess.run([sys.executable, "-m", "cai_jax.main", "--config=configs/tiny.py",
                      f"--workdir={w}", "--sweep=rl", "--config.compilation_cache=",
                      f"--config.evaluate.judge.cache_dir={tmp_path / 'judges'}"],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=2400)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  info = json.loads((w / "sweep.json").read_text())
  rows = info["rows"]
  assert len(rows) == 5 and len(set(info["judges"])) == 1
  for row in rows:
    assert row["rl_cai"] is not None and row["rl_cai_helpful"] is not None, row
    assert row["resident_gib"] > 0 and row["rl_seconds"] > 0
  # Critic-free points hold one model (and its optimizer state) fewer than PPO.
  ppo_row, grpo_row, rloo_row, dpo_row, ai_row = rows
  assert grpo_row["resident_gib"] < ppo_row["resident_gib"]
  assert rloo_row["resident_gib"] == grpo_row["resident_gib"]
  assert dpo_row["kl_k3"] is None and dpo_row["resident_gib"] < grpo_row["resident_gib"]
  dirs = {row["point"]: w / row["point"] for row in rows}
  for name, d in dirs.items():
    assert (d / "evaluate" / "DONE").exists(), name
    if name != ppo_row["point"]:
      assert (d / "sft").is_symlink() and (d / "pm").is_symlink(), name
  done = {n: json.loads((d / ("dpo" if n == dpo_row["point"] else "ppo") / "DONE").read_text())
          for n, d in dirs.items()}
  assert [done[r["point"]].get("algorithm") for r in rows] == ["ppo", "grpo", "rloo", None,
                                                                 "ppo"]
  assert done[ai_row["point"]]["reward"] == "ai" and done[dpo_row["point"]]["loss"] == "soft"
  assert not (dirs[grpo_row["point"]] / "ppo" / "value_final").exists()
  text = (w / "sweep.md").read_text()
  assert "RL-CAI helpfulness" in text and "KL to reference" in text
