"""The Constitutional AI pipeline: revise -> sft -> label -> pm -> ppo -> evaluate.

`base_config()` is the ConfigDict every config file starts from: the top-level
fields the stages share plus one section per stage (each stage's own
`default_config()`). `run(config, workdir)` runs the configured stages in that
order. A stage whose directory holds DONE is skipped; one without DONE is called
again and resumes from whatever partial output it left. Wall time per stage is
accumulated across attempts in WORKDIR/pipeline.json, and the run ends by writing
WORKDIR/report.md.
"""
from __future__ import annotations

import importlib
import json
import os
import time
from typing import Callable

from absl import logging
import ml_collections

from cai_jax import utils
from cai_jax.data import prompts
from cai_jax.utils import InputError

# Canonical order; config.stages picks a subset and they always run in this order.
STAGES = ("revise", "sft", "label", "pm", "ppo", "evaluate")
# Stage name -> module exposing default_config() and run(config, workdir).
STAGE_MODULES = {
    "revise": "cai_jax.stages.revise",
    "sft": "cai_jax.stages.sft",
    "label": "cai_jax.stages.label",
    "pm": "cai_jax.stages.preference",
    "ppo": "cai_jax.stages.ppo",
    "evaluate": "cai_jax.stages.evaluate",
}
# Model names load_model resolves without a file on disk.
BUILTIN_MODELS = ("tiny", "smollm2", "smollm2-135m", "smollm2-135m-instruct")
TIMINGS_FILE = "pipeline.json"


def _stage_module(name: str):
  path = STAGE_MODULES[name]
  try:
    return importlib.import_module(path)
  except ModuleNotFoundError as e:
    if e.name == path:
      return None
    raise


def base_config() -> ml_collections.ConfigDict:
  """Top-level fields shared by the stages, plus each available stage's section."""
  c = ml_collections.ConfigDict()
  c.stages = ",".join(STAGES)  # comma-separated subset of revise,sft,label,pm,ppo,evaluate
  c.seed = 0                   # one seed for sampling, principle draws, init and shuffles
  c.model = "tiny"             # initial helpful model: "tiny" | "smollm2" | HF dir | .gguf
  c.feedback_model = ""        # model answering the labelling questions; "" = same as model
  c.dtype = "float32"          # parameter/compute dtype: "float32" on CPU, "bfloat16" on TPU
  c.prompt_format = "chat"     # "chat": tokenizer chat template; "raw": Human:/Assistant: text
  c.constitution = "harmlessness"  # constitution name (constitutions/<name>.json) or a path
  c.mesh = ml_collections.ConfigDict()
  c.mesh.ici = (-1, 1, 1)      # (data, fsdp, tensor) within a slice; -1 fills the devices
  c.mesh.dcn = None            # same across slices (multi-slice pods); None = one slice
  c.logical_axis_rules = None  # None = cai_jax.sharding.DEFAULT_RULES
  # Persistent XLA compilation cache: a resumed or repeated run skips recompiling.
  c.compilation_cache = "~/.cache/cai_jax/xla"  # directory; "" disables
  # red_team / helpful ("builtin" or a path), num_red_team / num_helpful (-1 = all),
  # eval_fraction (share held out for evaluate): see cai_jax.data.prompts.
  c.data = prompts.default_config()
  # Ablations reuse earlier artifacts: stages listed here are linked from reuse_from.
  c.reuse_from = ""            # another WORKDIR whose finished stage dirs are reused
  c.reuse_stages = ""          # comma-separated stages to link from reuse_from (e.g. "revise,sft")
  for name in STAGES:
    mod = _stage_module(name)
    section = mod.default_config() if mod is not None and hasattr(mod, "default_config") \
        else ml_collections.ConfigDict()
    setattr(c, name, section)
  # Locked: a config file or --config.x=y naming a field that does not exist fails.
  c.lock()
  return c


def parse_stages(value) -> list[str]:
  """config.stages (comma string or sequence) -> validated list in canonical order."""
  if isinstance(value, str):
    names = [s.strip() for s in value.split(",") if s.strip()]
  else:
    names = [str(s).strip() for s in value]
  for n in names:
    if n not in STAGES:
      raise InputError(f"config.stages: unknown stage {n!r}; choose from {','.join(STAGES)}")
  if not names:
    raise InputError(f"config.stages is empty; list some of {','.join(STAGES)}")
  return [s for s in STAGES if s in names]


def _check_model_path(field: str, path: str) -> None:
  if path in BUILTIN_MODELS:
    return
  if not path:
    raise InputError(f"config.{field} is empty; set --config.{field}=PATH "
                     "(an HF checkpoint directory, a .gguf file, 'smollm2' or 'tiny')")
  if not os.path.exists(os.path.expanduser(path)):
    raise InputError(f"config.{field}: {path}: not found; point it at an HF checkpoint "
                     "directory or a .gguf file (or use 'smollm2' / 'tiny')")


def validate(config) -> list[str]:
  """Checks what can be checked before any stage runs; returns the stage list."""
  stages = parse_stages(config.stages)
  _check_model_path("model", config.model)
  if config.feedback_model:
    _check_model_path("feedback_model", config.feedback_model)
  for field in ("red_team", "helpful"):
    path = config.data[field]
    if path != "builtin" and not os.path.exists(os.path.expanduser(path)):
      raise InputError(f"config.data.{field}: {path}: not found; use 'builtin' or a file path")
  if config.prompt_format not in ("chat", "raw"):
    raise InputError(f"config.prompt_format={config.prompt_format!r}; use 'chat' or 'raw'")
  reuse = [s for s in str(config.reuse_stages).split(",") if s.strip()]
  if reuse:
    parse_stages(",".join(reuse))
    if not config.reuse_from:
      raise InputError("config.reuse_stages is set but config.reuse_from is empty; "
                       "set --config.reuse_from=OTHER_WORKDIR")
  return stages


def stage_dir(workdir: str, name: str) -> str:
  return os.path.join(workdir, name)


def _link_reused(config, workdir: str) -> None:
  reuse = parse_stages(config.reuse_stages) if str(config.reuse_stages).strip() else []
  for name in reuse:
    src = os.path.abspath(stage_dir(config.reuse_from, name))
    dst = stage_dir(workdir, name)
    if not utils.is_done(src):
      raise InputError(f"config.reuse_from: {src} has no DONE marker; finish that run's "
                       f"{name} stage first or drop {name} from config.reuse_stages")
    if os.path.lexists(dst):
      if os.path.islink(dst) and os.path.realpath(dst) == os.path.realpath(src):
        continue
      raise InputError(f"{dst} already exists; cannot link the reused {name} stage from {src} "
                       "(use a fresh --workdir)")
    os.symlink(src, dst)
    logging.info("stage %s: reusing %s", name, src)


def read_timings(workdir: str) -> dict:
  path = os.path.join(workdir, TIMINGS_FILE)
  if not os.path.exists(path):
    return {"stages": {}}
  with open(path) as f:
    return json.load(f)


def _record(workdir: str, name: str, seconds: float, status: str, summary=None,
            cpu_seconds: float = 0.0) -> None:
  t = read_timings(workdir)
  s = t["stages"].setdefault(name, {"seconds": 0.0, "attempts": 0})
  s["seconds"] += seconds
  # CPU time of all threads: on a shared machine wall time is inflated, this is not.
  s["cpu_seconds"] = s.get("cpu_seconds", 0.0) + cpu_seconds
  s["attempts"] += 1 if status != "skipped" else 0
  s["status"] = status
  if summary is not None:
    s["summary"] = _jsonable(summary)
  utils.atomic_write_text(os.path.join(workdir, TIMINGS_FILE), json.dumps(t, indent=2) + "\n")


def _jsonable(x):
  try:
    return json.loads(json.dumps(x, default=float))
  except (TypeError, ValueError):
    return {k: str(v) for k, v in dict(x).items()} if isinstance(x, dict) else str(x)


def _enable_compilation_cache(path: str) -> None:
  if not path:
    return
  import jax
  path = os.path.expanduser(path)
  try:
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    # Only programs that took a while to compile are worth the disk.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)
  except (OSError, AttributeError) as e:
    logging.warning("compilation cache at %s disabled: %s", path, e)


def resolve_stage(name: str) -> Callable:
  mod = _stage_module(name)
  if mod is None:
    raise InputError(f"config.stages: stage {name!r} is not available in this install "
                     f"({STAGE_MODULES[name]} is missing); drop it from config.stages")
  return mod.run


def run(config, workdir: str, registry: dict[str, Callable] | None = None,
        write_report: bool = True) -> dict:
  """Runs config.stages in order into workdir; returns {stage: summary, ...}.

  `registry` maps stage names to run functions (tests pass fakes); by default
  each comes from its module in cai_jax.stages.
  """
  stages = validate(config)
  _enable_compilation_cache(config.get("compilation_cache", ""))
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  utils.atomic_write_text(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2) + "\n")
  _link_reused(config, workdir)
  fns = {name: (registry[name] if registry and name in registry else None) for name in stages}
  for name in stages:
    if fns[name] is None:
      fns[name] = resolve_stage(name)
  from cai_jax import multihost
  results = {}
  t_start = time.time()
  for name in stages:
    d = stage_dir(workdir, name)
    # Process 0's marker decides for every host: hosts need not share its disk.
    if multihost.from_main(utils.is_done(d)):
      logging.info("stage %s: DONE marker found in %s, skipping", name, d)
      _record(workdir, name, 0.0, "skipped")
      results[name] = {"status": "skipped"}
      continue
    logging.info("stage %s: running (resumes any partial output in %s)", name, d)
    t0, c0 = time.time(), time.process_time()
    status = "interrupted"
    try:
      summary = fns[name](config, workdir) or {}
      status = "done"
    finally:
      dt = time.time() - t0
      _record(workdir, name, dt, status, summary if status == "done" else None,
              cpu_seconds=time.process_time() - c0)
      logging.info("stage %s: %s after %.1f s", name, status, dt)
    if multihost.is_main() and not utils.is_done(d):
      # Stages write DONE last themselves; this covers stages with nothing to store.
      utils.mark_done(d, _jsonable(summary))
    results[name] = {"status": "done", "seconds": dt, "summary": summary}
  t = read_timings(workdir)
  t["last_run_seconds"] = time.time() - t_start
  utils.atomic_write_text(os.path.join(workdir, TIMINGS_FILE), json.dumps(t, indent=2) + "\n")
  if write_report:
    from cai_jax.evaluation import report
    results["report"] = report.write_report(workdir)
  return results
