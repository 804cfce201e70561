"""Command line: run the Constitutional AI pipeline from a config file.

  python -m cai_jax.main --config=configs/demo.py --workdir=workdir/demo
  cai-jax --config=configs/tiny.py --workdir=/tmp/cai --config.stages=revise,sft
  cai-jax --config=configs/paper.py:model=/ckpt,human_data=/data/helpful.jsonl.gz --workdir=gs://bucket/run
  cai-jax --config=configs/demo.py --workdir=workdir/demo --config.label.num_principles=4 --rerun=label

`--config.x=y` overrides a field; `--sweep=NAME` runs the config module's
`sweep_NAME(add)` points, each into WORKDIR/<point>/. A workdir whose stages ran
with other settings is refused (exit 2, the fields named) unless `--rerun=STAGE`
discards that stage and the ones after it. Bad configuration and bad input
print one line and exit with status 2; SIGTERM and SIGINT save progress at the
next safe point and exit with 143 and 130 (rerun the command to resume). The terminal shows stages, progress
bars and summaries; WORKDIR/log.txt holds every log line.
"""
from __future__ import annotations

import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from cai_jax import interrupts

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (get_config(arg)); append :arg to pass an argument.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory; each stage writes WORKDIR/<stage>/.")
_SWEEP = flags.DEFINE_string("sweep", None, "Run the config module's sweep_<NAME>(add) points.")
_RERUN = flags.DEFINE_string("rerun", None, "Discard this stage and the stages after it in "
                             "WORKDIR, then run them again (e.g. after changing their settings).")

EXIT_BAD_INPUT = 2


def one_line(e: BaseException) -> str:
  """The most specific single line of an error message."""
  while not str(e).strip() and (e.__cause__ or e.__context__) is not None:
    e = e.__cause__ or e.__context__
  text = _unquote(str(e))
  lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
  if any(ln.startswith("Traceback") for ln in lines):
    # A traceback embedded in the message (config file errors): its last line.
    text = _unquote(lines[-1].split(": ", 1)[-1]) if lines else type(e).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
  text = " ".join(lines) or type(e).__name__
  if "Did you mean" in text or "does not exist" in text:
    text = "unknown config field " + re.sub(r'Other fields present: ".*?" ', "", text)
  return text


def os_error_line(e: OSError) -> str:
  """One line for a filesystem error: the path, the cause and the fix."""
  import errno
  where = e.filename or "the work directory"
  fix = {errno.ENOSPC: "the disk is full: free space and rerun the same command (finished "
                       "work is kept)",
         errno.EDQUOT: "the disk quota is exhausted: free space and rerun the same command",
         errno.EROFS: "read-only filesystem: choose another --workdir",
         errno.EACCES: "permission denied: make it writable or choose another --workdir",
         errno.ENOTDIR: "a file stands where a directory belongs: move it or choose another "
                        "--workdir"}.get(e.errno, "fix the path and rerun")
  return f"{where}: {e.strerror or type(e).__name__}; {fix}"


def _unquote(text: str) -> str:
  # KeyError (and AttributeError wrapping one) render their message as a repr.
  import ast
  for _ in range(3):
    t = text.strip()
    if len(t) > 1 and t[0] == t[-1] and t[0] in "'\"":
      try:
        text = ast.literal_eval(t)
        continue
      except (ValueError, SyntaxError):
        pass
    break
  return text


def _fail(msg: str) -> None:
  _stop(EXIT_BAD_INPUT, f"error: {msg}")


def _stop(status: int, msg: str) -> None:
  print(f"cai-jax: {msg}", file=sys.stderr, flush=True)
  sys.exit(status)


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # absl flag errors, config file errors, misspelt overrides
    _fail(one_line(e))


def _load_config():
  if not flags.FLAGS["config"].present:
    _fail("--config is required, e.g. --config=configs/demo.py")
  try:
    config = _CONFIG.value
    config.stages  # pylint: disable=pointless-statement
    return config
  except Exception as e:  # config_flags defers errors in the file until first access
    _fail(one_line(e))


def _sweep_points(name: str):
  import importlib.util
  path = flags.FLAGS["config"].config_filename
  spec = importlib.util.spec_from_file_location("_cai_jax_config_module", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  fn = getattr(mod, f"sweep_{name}", None)
  if fn is None:
    names = sorted(k[len("sweep_"):] for k in dir(mod) if k.startswith("sweep_"))
    _fail(f"{path}: no sweep_{name}(add); available sweeps: {', '.join(names) or 'none'}")
  points = []
  fn(lambda **kw: points.append(kw))
  return points


def _point_name(point: dict) -> str:
  shown = {k: ("+".join(map(str, v)) if isinstance(v, (tuple, list)) else v)
           for k, v in point.items() if not k.startswith("reuse_")}
  return ",".join(f"{k}={v}" for k, v in sorted(shown.items())).replace("/", "_") or "base"


def _apply(config, point: dict):
  from cai_jax.tools.config_file import override
  return override(config, point)


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments {' '.join(argv[1:])}; fields are set with --config.x=y")
  from cai_jax import pipeline
  from cai_jax.utils import InputError
  config = _load_config()
  if not _WORKDIR.value:
    _fail("--workdir is required, e.g. --workdir=workdir/demo")
  # Multi-host (CAI_JAX_DISTRIBUTED=1 or config.distributed.enabled): join the
  # other hosts before anything touches a device.
  from cai_jax import sharding
  from cai_jax.runtime import console
  sharding.maybe_initialize_distributed(config)
  console.setup()  # the pipeline adds WORKDIR/log.txt once the run's input is checked
  try:
    if _SWEEP.value:
      points = _sweep_points(_SWEEP.value)
      runs = [(os.path.join(_WORKDIR.value, _point_name(p)), p) for p in points]
      first = runs[0][0]
      for workdir, point in runs:
        if point.get("reuse_stages") and "reuse_from" not in point:
          # Ablations of later stages reuse the first point's earlier stages.
          point = dict(point, reuse_from=first)
        _report(pipeline.run(_apply(config, point), workdir, rerun=_RERUN.value))
        # The points share one process: drop what the last one compiled and held.
        import gc
        import jax
        gc.collect()
        jax.clear_caches()
      from cai_jax.evaluation import report
      path = report.write_sweep_summary(_WORKDIR.value,
                                        [(_point_name(p), w, p) for w, p in runs])
      print(f"\nSweep summary: {path}")
    else:
      _report(pipeline.run(config, _WORKDIR.value, rerun=_RERUN.value))
  except interrupts.Interrupted as e:
    _stop(e.exit_status, str(e))
  except OSError as e:  # the filesystem: full, read-only, a file where a folder belongs
    _fail(os_error_line(e))
  except (InputError, KeyError, AttributeError, TypeError) as e:
    if isinstance(e, InputError) or _is_config_error(e):
      _fail(one_line(e))
    raise
  signum = interrupts.received()
  if signum is not None:  # after the last safe point: the run is complete
    _stop(128 + signum, f"stopped by {interrupts.NAMES.get(signum, signum)} after the run "
          "finished; its outputs are complete")


def _report(results: dict) -> None:
  rep = results.get("report")
  if rep:
    print(f"\nReport: {rep['path']}")
    print("\n".join(rep["summary"]), flush=True)


def _is_config_error(e) -> bool:
  # ml_collections raises these for fields set in a sweep that the config lacks.
  return "config is locked" in str(e) or "does not exist" in str(e)


def run():
  """Runs the command line in this process (tests call this directly)."""
  # Preemption and `timeout` send SIGTERM, Ctrl-C SIGINT: recorded, acted on at the
  # loops' safe points (cai_jax/interrupts.py), exit 143 / 130 with one line.
  interrupts.install()
  logging.set_verbosity(logging.INFO)
  app.run(main, flags_parser=_parse_flags)


def cli():
  """Console script `cai-jax`: re-executes once with the malloc tunables, then runs."""
  from cai_jax import cpu_backend
  cpu_backend.reexec_with_malloc_tunables(module="cai_jax.main" if __name__ == "__main__" else None)
  run()


if __name__ == "__main__":
  cli()
