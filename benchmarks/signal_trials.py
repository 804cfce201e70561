"""SIGTERM and SIGINT at random times over the tiny pipeline: each run must stop within
30 s with status 143 / 130 and one line, and a rerun must finish with outputs
identical to an uninterrupted run.

  .venv/bin/python benchmarks/signal_trials.py [--trials 10] [--seed 0] [--workdir DIR]

Runs configs/tiny.py twice uninterrupted (the reference, then again with the
compilation cache warm: the two must agree), then `--trials` SIGTERM and
`--trials` SIGINT trials, alternating: start the pipeline, send the signal at a
time drawn uniformly over the warm run's wall time, time the stop, rerun the
same command, compare every record file and exported model with the reference's,
byte for byte. Each run trains its own held-out judge (a judge cache per run), so
its training is among the things interrupted. The last line printed is JSON.
"""
import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STOP_LIMIT_S = 30.0
# What a run produces that must not depend on where it was interrupted.
OUTPUTS = ("revise/records.jsonl", "revise/helpful.jsonl", "label/preferences.jsonl",
           "sft/final/model.safetensors", "pm/final/model.safetensors",
           "ppo/final/model.safetensors", "ppo/value_final/model.safetensors",
           "ppo/samples.jsonl", "evaluate/scores.jsonl", "evaluate/responses/helpful.jsonl",
           "evaluate/responses/sl_cai.jsonl", "evaluate/responses/rl_cai.jsonl")


def command(workdir: str, xla_cache: str) -> list:
  return [sys.executable, "-m", "cai_jax.main", "--config=configs/tiny.py",
          f"--workdir={workdir}", f"--config.compilation_cache={xla_cache}",
          f"--config.evaluate.judge.cache_dir={workdir}-judges"]


def environment() -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # one device, as a user runs it
  return env


def run_to_end(workdir: str, xla_cache: str, timeout: float = 1800) -> float:
  t0 = time.time()
  r = subprocess.run(command(workdir, xla_cache), cwd=ROOT, env=environment(),
                     capture_output=True, text=True, timeout=timeout)
  if r.returncode != 0:
    raise RuntimeError(f"run in {workdir} failed ({r.returncode}): {r.stderr[-2000:]}")
  return time.time() - t0


def differences(a: str, b: str) -> list:
  """The outputs whose bytes differ between work directories a and b."""
  out = []
  for rel in OUTPUTS:
    pa, pb = os.path.join(a, rel), os.path.join(b, rel)
    if not (os.path.exists(pa) and os.path.exists(pb)):
      out.append(f"{rel} (missing)")
    elif open(pa, "rb").read() != open(pb, "rb").read():
      out.append(rel)
  return out


def trial(reference: str, workdir: str, xla_cache: str, signum: int, at: float,
          after: str = "") -> dict:
  """One interrupted run and its rerun: what happened, against the reference.

  The signal is sent `at` seconds after the start, or, with `after` (a path inside
  the workdir, e.g. "ppo/settings.json"), `at` seconds after that path appears: a
  point in the run that does not depend on how busy the machine is."""
  p = subprocess.Popen(command(workdir, xla_cache), cwd=ROOT, env=environment(),
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  if after:
    while not os.path.exists(os.path.join(workdir, after)) and p.poll() is None:
      time.sleep(0.05)
  time.sleep(at)
  finished_first = p.poll() is not None
  t_sig = time.time()
  if not finished_first:
    p.send_signal(signum)
  try:
    _, err = p.communicate(timeout=STOP_LIMIT_S)
    stop_s = time.time() - t_sig
  except subprocess.TimeoutExpired:
    p.kill()
    _, err = p.communicate()
    stop_s = float("inf")
  lines = [ln for ln in err.splitlines() if ln.strip()]
  last = lines[-1] if lines else ""
  rerun_s = run_to_end(workdir, xla_cache)
  diff = differences(reference, workdir)
  want = 128 + signum
  ok = (finished_first or (p.returncode == want and stop_s <= STOP_LIMIT_S
                           and last.startswith("cai-jax: stopped by"))) and not diff
  return {"signal": signal.Signals(signum).name, "at_s": round(at, 1),
          "finished_before_signal": finished_first, "status": p.returncode,
          "stop_s": round(stop_s, 2), "message": last[:200], "rerun_s": round(rerun_s, 1),
          "differences": diff, "ok": bool(ok)}


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--trials", type=int, default=10, help="trials per signal")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--workdir", default="", help="where the runs go (default: a temp dir)")
  args = ap.parse_args(argv)
  root = args.workdir or tempfile.mkdtemp(prefix="cai-signals-")
  xla = os.path.join(root, "xla")
  ref = os.path.join(root, "reference")
  shutil.rmtree(ref, ignore_errors=True)
  ref_s = run_to_end(ref, xla)
  # A second uninterrupted run, with the compilation cache warm as the trials have it: its
  # outputs must equal the first's, and its time is the span the signals are drawn over.
  again = os.path.join(root, "reference-again")
  shutil.rmtree(again, ignore_errors=True)
  warm_s = run_to_end(again, xla)
  repeat_diff = differences(ref, again)
  print(f"reference runs: {ref_s:.0f} s cold, {warm_s:.0f} s warm; differences {repeat_diff}",
        flush=True)
  rng = random.Random(args.seed)
  results = []
  for i in range(2 * args.trials):
    signum = (signal.SIGTERM, signal.SIGINT)[i % 2]
    w = os.path.join(root, f"trial{i:02d}")
    shutil.rmtree(w, ignore_errors=True)
    shutil.rmtree(w + "-judges", ignore_errors=True)
    r = trial(ref, w, xla, signum, rng.uniform(3.0, 0.8 * warm_s))
    results.append(r)
    print(json.dumps(r), flush=True)
  stops = [r["stop_s"] for r in results if not r["finished_before_signal"]]
  summary = {"benchmark": "signal_trials", "trials": len(results),
             "ok": sum(r["ok"] for r in results),
             "signalled": sum(not r["finished_before_signal"] for r in results),
             "sigterm_143": sum(r["status"] == 143 for r in results if r["signal"] == "SIGTERM"),
             "sigint_130": sum(r["status"] == 130 for r in results if r["signal"] == "SIGINT"),
             "max_stop_s": max(stops) if stops else None,
             "identical_after_rerun": sum(not r["differences"] for r in results),
             "reference_s": round(ref_s, 1), "reference_warm_s": round(warm_s, 1),
             "uninterrupted_runs_identical": not repeat_diff}
  print(json.dumps(summary))
  return summary


if __name__ == "__main__":
  s = main()
  sys.exit(0 if s["ok"] == s["trials"] and s["uninterrupted_runs_identical"] else 1)
