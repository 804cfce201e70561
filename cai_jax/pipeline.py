"""The Constitutional AI pipeline: [generate_prompts ->] revise -> sft -> label -> pm -> ppo -> evaluate.

`base_config()` is the ConfigDict every config file starts from: the top-level
fields the stages share plus one section per stage (each stage's own
`default_config()`). `run(config, workdir)` runs the configured stages in that
order. Before anything runs, every configured stage that already holds results
in the workdir is checked against the settings that made them (a changed
setting stops the run with one line naming it; `rerun=STAGE` discards that
stage and the ones after it instead). A stage whose directory holds DONE is then
skipped; one without DONE is called again and resumes from its partial output.
Wall time per stage is accumulated across attempts in WORKDIR/pipeline.json,
and the run ends by writing WORKDIR/report.md.
"""
from __future__ import annotations

import functools
import importlib
import json
import os
import time
from typing import Callable, Optional

from absl import logging
import ml_collections

from cai_jax import interrupts, roles, utils
from cai_jax.data import prompts
from cai_jax.runtime import checks, console, provenance
from cai_jax.runtime.stagelist import (DEFAULT_STAGES, STAGE_MODULES, STAGES, later_stages,
                                       parse_list, parse_stages)
from cai_jax.utils import InputError

TIMINGS_FILE = "pipeline.json"
CONFIG_FILE = "config.json"
LOG_FILE = "log.txt"  # every log line of the runs in this workdir


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
  c.stages = DEFAULT_STAGES    # subset of STAGES (generate_prompts is optional); always run in order
  c.seed = 0                   # one seed for sampling, principle draws, init and shuffles
  c.model = "tiny"             # initial helpful model: "tiny" | "smollm2" | HF dir | .gguf
  c.feedback_model = ""        # model answering the labelling questions; "" = same as model
  c.dtype = "float32"          # parameter/compute dtype: "float32" on CPU, "bfloat16" on TPU
  c.frozen_dtype = ""          # dtype of models only read: PPO's reference and reward PM, the
                               # feedback model (label, ppo.reward=ai); "" = dtype
  c.export_dtype = ""          # dtype of the stages' HF exports; "" = the params' (bf16 on TPU)
  c.prompt_format = "chat"     # "chat": tokenizer chat template; "raw": Human:/Assistant: text
  c.constitution = "harmlessness"  # constitution name (constitutions/<name>.json) or a path
  c.mesh = ml_collections.ConfigDict()
  c.mesh.ici = (-1, 1, 1)      # (data, fsdp, tensor) within a slice; -1 fills the devices
  c.mesh.dcn = None            # same across slices (multi-slice pods); None = one slice
  c.logical_axis_rules = None  # None = cai_jax.sharding.DEFAULT_RULES
  # Persistent XLA compilation cache: a resumed or repeated run skips recompiling.
  c.compilation_cache = "~/.cache/cai_jax/xla"  # directory; "" disables
  # Finished stages delete their Orbax checkpoints (their final/ exports stay and later
  # runs skip them); True keeps them, e.g. to continue training from a saved step.
  c.keep_checkpoints_when_done = False
  # Device memory (GiB) the training stages fit their steps to (micro-batches, remat);
  # 0 = the runtime's (TPU, GPU); the CPU reports none, so CPU steps are not fitted.
  c.hbm_gib = 0.0
  # red_team / helpful ("builtin" or a path), num_red_team / num_helpful (-1 = all),
  # eval_fraction (share held out for evaluate): see cai_jax.data.prompts.
  c.data = prompts.default_config()
  # Ablations reuse earlier artifacts: stages listed here are linked from reuse_from.
  c.reuse_from = ""            # another WORKDIR whose finished stage dirs are reused
  c.reuse_stages = ()          # stages to link from reuse_from, e.g. ("revise", "sft")
  for name in STAGES:
    mod = _stage_module(name)
    section = mod.default_config() if mod is not None and hasattr(mod, "default_config") \
        else ml_collections.ConfigDict()
    setattr(c, name, section)
  # Locked: a config file or --config.x=y naming a field that does not exist fails.
  c.lock()
  return c


RL_SHARED = ("revise", "sft", "label", "pm")


def sweep_rl(add) -> None:
  """The RL-CAI variants from one SL-CAI model, one set of AI labels and one PM:
  PPO (the paper), GRPO (k3 KL in the loss), RLOO, soft-label DPO without RL, and
  PPO on the feedback model's direct reward. The later points link the first
  point's revise, sft, label and pm; each point's evaluate grades its own RL
  snapshot with the held-out judge. Config modules expose it as `sweep_rl`."""
  add(**{"ppo.algorithm": "ppo"})
  add(**{"ppo.algorithm": "grpo", "ppo.kl_in": "loss", "reuse_stages": RL_SHARED})
  add(**{"ppo.algorithm": "rloo", "reuse_stages": RL_SHARED})
  add(**{"stages": RL_SHARED + ("dpo", "evaluate"), "dpo.loss": "soft",
         "reuse_stages": RL_SHARED})
  add(**{"ppo.reward": "ai", "ppo.value_init": "policy", "reuse_stages": RL_SHARED})


def sweep_axes(add) -> None:
  """One scalar PM against a PM with a head per constitution axis, the RL reward
  weighing the axes two ways, all on the same per-axis labels (the scalar PM trains
  on their mean): the later points link the first point's revise, sft and label.
  Config modules expose it as `sweep_axes`."""
  add(**{"label.per_axis": True})
  for weights in ("", "harm:2,ethics:1,helpfulness:1"):
    add(**{"label.per_axis": True, "pm.per_axis_heads": True, "ppo.axis_weights": weights,
           "reuse_stages": ("revise", "sft", "label")})


def sweep_online(add) -> None:
  """The PM trained once (the paper) against refreshed on the current policy's
  labelled samples every K RL iterations (`ppo.online`), from one SL-CAI model,
  one set of AI labels and one starting PM: the later points link the first
  point's revise, sft, label and pm. Config modules expose it as `sweep_online`."""
  add(**{"ppo.online.refresh_every": 0})
  for k in (2, 1):
    add(**{"ppo.online.refresh_every": k, "reuse_stages": RL_SHARED})


def validate(config) -> list[str]:
  """Checks what can be checked before any stage runs; returns the stage list."""
  stages = parse_stages(config.stages)
  if not stages:
    raise InputError(f"config.stages is empty; list some of {','.join(STAGES)}")
  roles.check("model", config.model)
  if config.feedback_model:
    roles.check("feedback_model", config.feedback_model)
  # Models a configured stage names itself; "" means a default resolved at run time.
  for field in ("sft.init_from", "label.policy", "pm.init_from", "ppo.init_from", "ppo.pm",
                "dpo.init_from",
                "evaluate.pm", "evaluate.judge.path", "evaluate.judge.model"):
    value = functools.reduce(lambda d, k: d[k], field.split("."), config)
    if field.split(".")[0] in stages and value:
      roles.check(field, str(value))
  for field in ("red_team", "helpful"):
    path = config.data[field]
    if path != "builtin" and not utils.exists(str(path)):
      raise InputError(f"config.data.{field}: {path}: not found; use 'builtin' or a file path")
  if str(config.dtype) not in ("float32", "bfloat16", "float16"):
    raise InputError(f"config.dtype={config.dtype!r}; use 'float32' (CPU), 'bfloat16' (TPU) "
                     "or 'float16'")
  if config.prompt_format not in ("chat", "raw"):
    raise InputError(f"config.prompt_format={config.prompt_format!r}; use 'chat' or 'raw'")
  checks.check(config, stages)
  checks.check_mesh(config, {s: config[s] for s in stages if s in config})
  for name in stages:
    mod = _stage_module(name)
    if mod is not None and hasattr(mod, "check_config"):
      mod.check_config(config)
  _check_inputs(config, stages)
  reuse = parse_stages(config.reuse_stages, "config.reuse_stages")
  if reuse and not config.reuse_from:
    raise InputError("config.reuse_stages is set but config.reuse_from is empty; "
                     "set --config.reuse_from=OTHER_WORKDIR")
  return stages


def _check_inputs(config, stages) -> None:
  """The constitution and prompt sets the configured stages will read, loaded now, so
  that a gap is found before the first stage rather than in a later one."""
  # ppo.reward=ai and online refreshes label with the constitution's choice principles.
  ai_reward = "ppo" in stages and (str(config.ppo.reward) == "ai"
                                   or int(config.ppo.online.refresh_every) > 0)
  if {"revise", "label", "evaluate"} & set(stages) or ai_reward:
    from cai_jax import constitution
    const = constitution.load(config.constitution)
    wants_choice = "label" in stages or ai_reward or (
        "evaluate" in stages and "feedback" in parse_list(config.evaluate.judges))
    if wants_choice and not const.choice_principles:
      raise InputError(f"{const.source or config.constitution}: no choice_principles, which "
                       "the label stage (and the feedback judge, and ppo.reward=ai) ask the "
                       "feedback model; add some (format: constitutions/README.md)")
  grown = str(config.generate_prompts.kind) if "generate_prompts" in stages else None
  need = []
  if "revise" in stages:
    need.append(("red_team", str(config.revise.split), "revise"))
    if int(config.revise.helpful_samples) > 0:
      need.append(("helpful", "train", "revise.helpful_samples"))
  if "label" in stages:
    need.append(("red_team", str(config.label.split), "label"))
  if "ppo" in stages:
    frac = float(config.ppo.red_team_fraction)
    need += ([("red_team", "train", "ppo")] if frac > 0 else []) + \
        ([("helpful", "train", "ppo")] if frac < 1 else [])
  if "evaluate" in stages:
    need += [("red_team", "eval", "evaluate"), ("helpful", "eval", "evaluate")]
  for kind, split, who in need:
    if kind != grown and not prompts.load_prompts(config.data, kind, split):
      raise InputError(f"config.data.{kind}={config.data[kind]}: no {kind} prompts in the "
                       f"{split!r} split that "
                       f"{who} reads (data.num_{kind}={config.data['num_' + kind]}, "
                       f"data.eval_fraction={config.data.eval_fraction}); give more prompts")


def effective_config(config, workdir: str, stages) -> ml_collections.ConfigDict:
  """The config the stages run with: when generate_prompts is part of the run,
  the later stages read its prompts (data.<kind> = WORKDIR/generate_prompts)."""
  if "generate_prompts" not in stages:
    return config
  c = config.copy_and_resolve_references()
  kind = str(c.generate_prompts.kind)
  if kind in ("red_team", "helpful"):
    c.data[kind] = utils.join(utils.resolve_dir(workdir), "generate_prompts")
  return c


def stage_dir(workdir: str, name: str) -> str:
  return utils.join(workdir, name)


def _link_reused(config, workdir: str) -> None:
  import os
  for name in parse_stages(config.reuse_stages, "config.reuse_stages"):
    src = utils.resolve_dir(stage_dir(config.reuse_from, name))
    dst = stage_dir(workdir, name)
    if not utils.is_done(src):
      raise InputError(f"config.reuse_from: {src} has no DONE marker; finish that run's "
                       f"{name} stage first or drop {name} from config.reuse_stages")
    if utils.is_url(dst) or utils.is_url(src):
      raise InputError("config.reuse_stages links stage directories, which object stores "
                       "cannot; copy the stage directory into the workdir instead")
    if os.path.lexists(dst):
      if os.path.islink(dst) and os.path.realpath(dst) == os.path.realpath(src):
        continue
      raise InputError(f"{dst} already exists; cannot link the reused {name} stage from {src} "
                       "(use a fresh --workdir)")
    os.symlink(src, dst)
    logging.info("stage %s: reusing %s", name, src)


def read_timings(workdir: str) -> dict:
  path = utils.join(workdir, TIMINGS_FILE)
  t = utils.read_json(path, {"stages": {}})
  if not (isinstance(t, dict) and isinstance(t.get("stages"), dict)):
    raise InputError(f"{path}: not a pipeline record (no 'stages' object); delete it (it holds "
                     "only timings) and rerun")
  return t


def check_workdir(workdir: str) -> None:
  """The work directory can be created and written, before anything is."""
  if utils.is_url(workdir):
    return
  import tempfile
  probe = workdir
  while not os.path.lexists(probe):
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe):
    raise InputError(f"--workdir={workdir}: {probe} is a file, not a directory; choose another "
                     "--workdir")
  try:
    tempfile.TemporaryFile(dir=probe).close()
  except OSError as e:
    raise InputError(f"--workdir={workdir}: cannot write in {probe} ({e.strerror}); choose "
                     "another --workdir or make it writable") from None


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
  utils.write_json(utils.join(workdir, TIMINGS_FILE), t)


def _jsonable(x):
  try:
    return json.loads(json.dumps(x, default=float))
  except (TypeError, ValueError):
    return {k: str(v) for k, v in dict(x).items()} if isinstance(x, dict) else str(x)


def _enable_compilation_cache(path: str) -> None:
  if not path:
    return
  import os
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


def check_settings(config, workdir: str, stages, skip=()) -> None:
  """Refuses (InputError) a stage whose results in `workdir` came from other settings."""
  for name in stages:
    if name in skip:
      continue
    mod = _stage_module(name)
    if mod is None or not hasattr(mod, "settings"):
      continue
    provenance.check(stage_dir(workdir, name), name, mod.settings(config, workdir))


def discard(workdir: str, stage: str) -> list[str]:
  """Deletes `stage` and every later stage's directory (a reused stage's link
  only); returns the stages removed."""
  removed = []
  for name in later_stages(stage):
    d = stage_dir(workdir, name)
    if utils.exists(d) or (not utils.is_url(d) and _lexists(d)):
      utils.remove(d)
      removed.append(name)
  return removed


def _lexists(path: str) -> bool:
  import os
  return os.path.lexists(path)


def _say(text: str) -> None:
  print(text, flush=True)


def _summary_line(summary: dict, limit: int = 6) -> str:
  parts = []
  for k, v in summary.items():
    if isinstance(v, bool) or not isinstance(v, (int, float)):
      continue
    parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    if len(parts) >= limit:
      break
  return ", ".join(parts)


def run(config, workdir: str, registry: Optional[dict[str, Callable]] = None,
        write_report: bool = True, rerun: Optional[str] = None) -> dict:
  """Runs config.stages in order into workdir; returns {stage: summary, ...}.

  `registry` maps stage names to run functions (tests pass fakes); by default
  each comes from its module in cai_jax.stages. `rerun` names a stage to discard,
  with every stage after it, and run again.
  """
  stages = validate(config)
  workdir = utils.resolve_dir(workdir)
  check_workdir(workdir)
  read_timings(workdir)
  config = effective_config(config, workdir, stages)
  if rerun:
    if rerun not in STAGES:
      raise InputError(f"--rerun={rerun}: unknown stage; choose from {','.join(STAGES)}")
  fns = {name: (registry[name] if registry and name in registry else None) for name in stages}
  for name in stages:
    if fns[name] is None:
      fns[name] = resolve_stage(name)
  redo = set(later_stages(rerun)) if rerun else set()
  check_settings(config, workdir, [s for s in stages if not (registry and s in registry)],
                 skip=redo)
  from cai_jax import multihost
  if rerun and multihost.is_main():
    removed = discard(workdir, rerun)
    logging.info("--rerun=%s: discarded %s", rerun, ", ".join(removed) or "nothing")
  multihost.sync("pipeline: rerun")
  _enable_compilation_cache(config.get("compilation_cache", ""))
  if multihost.is_main():
    utils.makedirs(workdir)
    _link_reused(config, workdir)
    console.log_to(None if utils.is_url(workdir) else utils.join(workdir, LOG_FILE))
  multihost.sync("pipeline: workdir ready")
  todo = [n for n in stages if not multihost.from_main(utils.is_done(stage_dir(workdir, n)))]
  if todo and multihost.is_main():
    # config.json describes the run that produced the results: written only when
    # a stage runs (a changed setting was refused above).
    utils.atomic_write_text(utils.join(workdir, CONFIG_FILE),
                            config.to_json_best_effort(indent=2) + "\n")
  results = {}
  t_start = time.time()
  for k, name in enumerate(stages, 1):
    d = stage_dir(workdir, name)
    head = f"[{k}/{len(stages)}] {name}"
    if name not in todo:
      _say(f"{head}: finished earlier (DONE in {d}), skipped")
      if multihost.is_main():
        _record(workdir, name, 0.0, "skipped")
      results[name] = {"status": "skipped"}
      continue
    interrupts.check(f"the pipeline, before {name}", collective=True)
    _say(f"{head}: running (resumes any partial output in {d})")
    t0, c0 = time.time(), time.process_time()
    status = "interrupted"
    summary: dict = {}
    try:
      summary = fns[name](config, workdir) or {}
      status = "done"
    except BaseException as e:
      status = ("interrupted" if isinstance(e, (interrupts.Interrupted, KeyboardInterrupt))
                else "failed")
      raise
    finally:
      dt = time.time() - t0
      if multihost.is_main():
        try:
          _record(workdir, name, dt, status, summary if status == "done" else None,
                  cpu_seconds=time.process_time() - c0)
        except OSError as e:  # a full disk: the stage's own error is the one to report
          if status == "done":
            raise
          logging.warning("could not record the %s attempt in %s: %s", name, TIMINGS_FILE, e)
    if multihost.is_main() and not utils.is_done(d):
      # Stages write DONE last themselves; this covers stages with nothing to store.
      utils.mark_done(d, _jsonable(summary))
    _say(f"{head}: done in {dt:.0f} s" + (f" ({_summary_line(summary)})" if summary else ""))
    results[name] = {"status": "done", "seconds": dt, "summary": summary}
  if multihost.is_main():
    t = read_timings(workdir)
    t["last_run_seconds"] = time.time() - t_start
    utils.write_json(utils.join(workdir, TIMINGS_FILE), t)
  if write_report and multihost.is_main():
    from cai_jax.evaluation import report
    results["report"] = report.write_report(workdir)
  return results


__all__ = ["STAGES", "DEFAULT_STAGES", "base_config", "run", "validate", "parse_stages",
           "parse_list", "discard", "check_settings"]
