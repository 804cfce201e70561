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
  assert info["field"] == "revise.num_revisions" and info["values"] == [1, 2, 3, 4]
  assert len(info["judges"]) == 4 and len(set(info["judges"])) == 1 and info["judges"][0]
  for row in info["rows"]:
    assert row["judge"] == info["judges"][0] and row["rl_cai"] is not None
  # One judge trained, cached, reused by every point.
  assert len(os.listdir(tmp_path / "judges")) == 1
  text = (w / "sweep.md").read_text()
  assert "graded by the same held-out judge" in text and "sweep.png" in text
  img = mpimg.imread(str(w / "sweep.png"))
  assert img.shape[0] > 200 and img[..., :3].std() > 0.02
