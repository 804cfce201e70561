"""Command line: bad configuration and bad input give one line and exit status 2."""
import os
import subprocess
import sys

import pytest
from absl import flags

from cai_jax import main, pipeline
from cai_jax.utils import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args, timeout=240):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "cai_jax.main", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("extra,needle", [
    (["--config.stages=revise,critique"], "unknown stage 'critique'"),
    (["--config.model=/no/such/model"], "/no/such/model: not found"),
    (["--config.data.num_red_tem=3"], "num_red_tem"),                 # misspelt override
    (["--config.seed=abc"], "--config.seed=abc"),                     # wrong type
    (["--config=configs/no_such_config.py"], "no_such_config.py"),    # missing config file
])
def test_bad_config_one_line_exit_2(extra, needle, tmp_path):
  r = _cli("--config=configs/tiny.py", f"--workdir={tmp_path}", *extra)
  assert r.returncode == 2, r.stderr
  lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
  assert len(lines) == 1, r.stderr
  assert lines[0].startswith("cai-jax: error: ") and needle in lines[0], lines[0]
  assert not os.path.exists(tmp_path / "revise")


def test_misspelt_field_in_config_file(tmp_path):
  cfg = tmp_path / "typo.py"
  cfg.write_text("from cai_jax import pipeline\n\n\ndef get_config(arg=None):\n"
                 "  c = pipeline.base_config()\n  c.revise_rounds = 3\n  return c\n")
  r = _cli(f"--config={cfg}", f"--workdir={tmp_path / 'w'}")
  lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
  assert r.returncode == 2 and len(lines) == 1 and "revise_rounds" in lines[0], r.stderr


def test_missing_workdir_exit_2():
  r = _cli("--config=configs/tiny.py")
  assert r.returncode == 2 and "--workdir is required" in r.stderr


def test_stage_input_error_exit_2(tmp_path, monkeypatch, capsys):
  def bad_stage(config, workdir):
    raise InputError("records.jsonl:3: malformed JSON; fix or remove the line")
  monkeypatch.setattr(pipeline, "resolve_stage", lambda name: bad_stage)
  flags.FLAGS.unparse_flags()
  monkeypatch.setattr(sys, "argv", ["cai-jax", f"--config={ROOT}/configs/tiny.py",
                                    f"--workdir={tmp_path}", "--config.stages=revise"])
  with pytest.raises(SystemExit) as e:
    main.run()
  assert e.value.code == 2
  err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("cai-jax")]
  assert err == ["cai-jax: error: records.jsonl:3: malformed JSON; fix or remove the line"]
  flags.FLAGS.unparse_flags()


def test_one_line_unwraps_repr_messages():
  e = AttributeError(repr("'num_red_tem'\nDid you mean \"num_red_team\"?"))
  assert main.one_line(e) == "unknown config field 'num_red_tem' Did you mean \"num_red_team\"?"


def test_sweep_runs_each_point_and_reuses(tmp_path, monkeypatch, capsys):
  from cai_jax import utils
  calls = []

  def fake(name):
    def run(config, workdir):
      calls.append((name, os.path.basename(workdir), config.seed))
      utils.mark_done(os.path.join(workdir, name), {"seed": config.seed})
      return {"seed": config.seed}
    return run
  monkeypatch.setattr(pipeline, "resolve_stage", fake)
  cfg = tmp_path / "sweepcfg.py"
  cfg.write_text(
      "from cai_jax import pipeline\n\n\ndef get_config(arg=None):\n"
      "  c = pipeline.base_config()\n  c.stages = ('revise', 'sft')\n  return c\n\n\n"
      "def sweep_seeds(add):\n  add(seed=1)\n"
      "  add(seed=2, reuse_stages='revise')\n")
  flags.FLAGS.unparse_flags()
  monkeypatch.setattr(sys, "argv", ["cai-jax", f"--config={cfg}", f"--workdir={tmp_path / 'w'}",
                                    "--sweep=seeds", "--config.compilation_cache="])
  with pytest.raises(SystemExit) as e:
    main.run()
  flags.FLAGS.unparse_flags()
  assert e.value.code in (0, None)
  # The second point reuses the first point's revise stage and runs only sft.
  assert calls == [("revise", "seed=1", 1), ("sft", "seed=1", 1), ("sft", "seed=2", 2)]
  assert os.path.islink(tmp_path / "w" / "seed=2" / "revise")
  assert (tmp_path / "w" / "sweep.md").exists()
  assert "Sweep summary" in capsys.readouterr().out


def test_full_disk_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
  import errno
  import signal

  def full(config, workdir):
    raise OSError(errno.ENOSPC, "No space left on device", os.path.join(workdir, "x.jsonl"))
  monkeypatch.setattr(pipeline, "resolve_stage", lambda name: full)
  saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
  flags.FLAGS.unparse_flags()
  cfg = tmp_path / "revise_only.py"
  cfg.write_text("from cai_jax import pipeline\n\n\ndef get_config(arg=None):\n"
                 "  c = pipeline.base_config()\n  c.stages = ('revise',)\n  return c\n")
  w = tmp_path / "w"
  monkeypatch.setattr(sys, "argv", ["cai-jax", f"--config={cfg}", f"--workdir={w}"])
  try:
    with pytest.raises(SystemExit) as e:
      main.run()
  finally:
    flags.FLAGS.unparse_flags()
    for s, h in saved.items():
      signal.signal(s, h)
  assert e.value.code == 2
  err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("cai-jax")]
  assert err == [f"cai-jax: error: {w}/x.jsonl: No space left on device; the disk is "
                 "full: free space and rerun the same command (finished work is kept)"]
  t = pipeline.read_timings(str(w))
  assert t["stages"]["revise"]["status"] == "failed"
