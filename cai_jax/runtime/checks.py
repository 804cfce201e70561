"""Every numeric and enumerated setting checked before any stage runs.

`check(config, stages)` walks the rules below for the sections the configured
stages read and raises one `InputError` naming the first bad field, its value
and what it must be. Types are already enforced by ml_collections (an integer
field stays an integer); this adds ranges, choices, finiteness and the
divisibility rules between fields, so that `sft.batch_size=0` or a NaN
learning rate stops the run before anything is written rather than as a
traceback (or a silent one-step run) in the middle of it.
"""
from __future__ import annotations

import math
from typing import Callable

from cai_jax.utils import InputError


class Rule:
  def __init__(self, ok: Callable, want: str):
    self.ok, self.want = ok, want


def _num(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


POSITIVE = Rule(lambda v: _int(v) and v >= 1, "an integer >= 1")
NONNEG = Rule(lambda v: _int(v) and v >= 0, "an integer >= 0")
ALL_OR_POSITIVE = Rule(lambda v: _int(v) and (v == -1 or v >= 1), "-1 (all) or an integer >= 1")
ALL_OR_NONNEG = Rule(lambda v: _int(v) and v >= -1, "-1 (all) or an integer >= 0")
FRACTION = Rule(lambda v: _num(v) and 0 <= v <= 1, "a number in [0, 1]")
HOLDOUT = Rule(lambda v: _num(v) and 0 <= v < 1, "a number in [0, 1)")
OPEN_FRACTION = Rule(lambda v: _num(v) and 0 < v < 1, "a number in (0, 1)")
TOP_P = Rule(lambda v: _num(v) and 0 < v <= 1, "a number in (0, 1]")
POS_FLOAT = Rule(lambda v: _num(v) and v > 0, "a finite number > 0")
NONNEG_FLOAT = Rule(lambda v: _num(v) and v >= 0, "a finite number >= 0")
FINITE = Rule(_num, "a finite number")


def one_of(*choices) -> Rule:
  return Rule(lambda v: v in choices, "one of " + ", ".join(repr(c) for c in choices))


OPTIM = {
    "learning_rate": NONNEG_FLOAT, "schedule": one_of("constant", "cosine", "linear"),
    "warmup_steps": NONNEG, "decay_steps": NONNEG, "end_lr_fraction": FRACTION,
    "b1": HOLDOUT, "b2": HOLDOUT, "eps": POS_FLOAT, "weight_decay": NONNEG_FLOAT,
    "grad_clip": NONNEG_FLOAT, "grad_accum_steps": POSITIVE,
}
TRAIN = {  # what every supervised stage's loop reads
    "max_len": POSITIVE, "batch_size": POSITIVE, "num_epochs": POS_FLOAT,
    "max_steps": ALL_OR_POSITIVE, "eval_fraction": HOLDOUT, "eval_every": NONNEG,
    "log_every": POSITIVE, "train_top_layers": ALL_OR_POSITIVE, "checkpoint_every": POSITIVE,
    "keep_checkpoints": POSITIVE, "optim": OPTIM, "micro_batches": NONNEG,
}
LORA = {"rank": NONNEG, "alpha": POS_FLOAT,
        "targets": Rule(lambda v: isinstance(v, (tuple, list)) and len(v) > 0 and set(v) <= {
            "q", "k", "v", "o", "gate", "up", "down"},
            "a non-empty tuple of q, k, v, o, gate, up, down")}
SAMPLING = {"temperature": NONNEG_FLOAT, "top_p": TOP_P, "max_new_tokens": POSITIVE,
            "batch_size": POSITIVE}
SPLIT = one_of("train", "eval", "all")

RULES = {
    "data": {"num_red_team": ALL_OR_POSITIVE, "num_helpful": ALL_OR_NONNEG,
             "eval_fraction": HOLDOUT},
    "revise": {**SAMPLING, "num_revisions": POSITIVE, "num_principles": ALL_OR_POSITIVE,
               "num_fewshot": ALL_OR_NONNEG, "critique_max_new_tokens": POSITIVE,
               "revision_max_new_tokens": POSITIVE, "max_prompt_tokens": NONNEG,
               "retry_empty": NONNEG, "helpful_samples": NONNEG, "split": SPLIT,
               "chunk_size": POSITIVE},
    "sft": {**TRAIN, "num_rounds": ALL_OR_POSITIVE, "logits_chunk": NONNEG, "lora": LORA},
    "label": {**SAMPLING, "num_principles": POSITIVE, "num_fewshot": ALL_OR_NONNEG,
              "debias_mean": one_of("probability", "logprob"), "cot_samples": POSITIVE,
              "cot_max_new_tokens": POSITIVE, "cot_temperature": NONNEG_FLOAT,
              "num_cot_fewshot": ALL_OR_NONNEG, "split": SPLIT, "score_tokens": POSITIVE,
              "chunk_size": POSITIVE, "max_prompt_tokens": NONNEG},
    "pm": {**TRAIN, "human_fraction": FRACTION, "max_human_pairs": ALL_OR_POSITIVE,
           "pretrain_steps": NONNEG, "pretrain_lr": NONNEG_FLOAT,
           "max_eval_pairs": ALL_OR_POSITIVE,
           "score_init_std": NONNEG_FLOAT, "calibration_bins": POSITIVE},
    "ppo": {"algorithm": one_of("ppo", "grpo", "rloo"), "reward": one_of("pm", "ai"),
            "group_size": POSITIVE,
            "kl_in": one_of("reward", "loss"),
            "num_iterations": POSITIVE, "batch_size": POSITIVE, "red_team_fraction": FRACTION,
            "max_prompt_tokens": POSITIVE, "max_new_tokens": POSITIVE,
            "temperature": POS_FLOAT, "missing_eos_penalty": FINITE, "gamma": FRACTION,
            "lam": FRACTION, "num_epochs": POSITIVE, "num_minibatches": POSITIVE,
            "clip_eps": POS_FLOAT, "value_clip_eps": POS_FLOAT, "vf_coef": NONNEG_FLOAT,
            "ent_coef": NONNEG_FLOAT, "micro_batches": NONNEG, "lora": LORA,
            "kl": {"kind": one_of("adaptive", "fixed"), "beta": NONNEG_FLOAT,
                   "target": POS_FLOAT, "horizon": POSITIVE},
            "policy_optim": OPTIM, "value_optim": OPTIM, "train_top_layers": ALL_OR_POSITIVE,
            "value_init": one_of("pm", "policy"), "checkpoint_every": POSITIVE,
            "keep_checkpoints": POSITIVE, "pm_max_len": NONNEG, "log_samples_every": NONNEG,
            "num_logged_samples": NONNEG,
            "online": {"refresh_every": NONNEG, "prompts_per_refresh": POSITIVE,
                       "pm_steps": POSITIVE, "pm_batch_size": POSITIVE,
                       "replay_ratio": NONNEG_FLOAT,
                       "human_fraction": Rule(lambda v: _num(v) and (v == -1 or 0 <= v <= 1),
                                              "-1 (config.pm's) or in [0, 1]"),
                       "pm_optim": OPTIM}},
    "dpo": {**TRAIN, "human_fraction": FRACTION, "max_human_pairs": ALL_OR_POSITIVE,
            "loss": one_of("soft", "dpo", "ipo"), "beta": POS_FLOAT,
            "max_eval_pairs": ALL_OR_POSITIVE},
    "evaluate": {**SAMPLING, "num_prompts": ALL_OR_POSITIVE, "samples_per_prompt": POSITIVE,
                 "pm_max_len": NONNEG, "elo_method": one_of("fisher", "bootstrap"),
                 "elo_bootstrap": POSITIVE, "revision_records": ALL_OR_NONNEG,
                 "mc_max_items": ALL_OR_POSITIVE, "mc_few_shot": NONNEG,
                 "mc_debias_max_options": POSITIVE, "num_report_samples": NONNEG,
                 "judge": {"heldout_fraction": OPEN_FRACTION, "max_pairs": ALL_OR_POSITIVE,
                           "max_eval_pairs": ALL_OR_POSITIVE, "max_len": POSITIVE,
                           "steps": POSITIVE, "batch_size": POSITIVE,
                           "learning_rate": NONNEG_FLOAT, "train_top_layers": ALL_OR_POSITIVE},
                 "harmfulness": {"steps": POSITIVE, "batch_size": POSITIVE,
                                 "learning_rate": NONNEG_FLOAT, "weight_decay": NONNEG_FLOAT,
                                 "max_len": POSITIVE, "eval_fraction": HOLDOUT}},
    "generate_prompts": {**SAMPLING, "kind": one_of("red_team", "helpful"),
                         "num_prompts": POSITIVE, "max_chunks": POSITIVE, "num_shots": POSITIVE,
                         "style": one_of("list", "chat"), "min_chars": NONNEG,
                         "max_chars": POSITIVE, "near_dup_threshold": FRACTION,
                         "chunk_size": POSITIVE},
}


def _walk(section, rules: dict, prefix: str) -> None:
  for key, rule in rules.items():
    if key not in section:
      continue
    value, field = section[key], f"{prefix}.{key}" if prefix else key
    if isinstance(rule, dict):
      _walk(value, rule, field)
    elif not rule.ok(value):
      raise InputError(f"config.{field}={value!r}: must be {rule.want}")


def check_section(name: str, section) -> None:
  """One stage's section: its rules and the rules between its fields."""
  _walk(section, RULES.get(name, {}), name)
  if name == "ppo" and section.batch_size % section.num_minibatches:
    raise InputError(f"config.ppo.batch_size={section.batch_size} is not divisible by "
                     f"config.ppo.num_minibatches={section.num_minibatches}; make it a multiple")
  if name == "ppo" and section.get("algorithm", "ppo") != "ppo":
    if section.group_size < 2:
      raise InputError(f"config.ppo.group_size={section.group_size}: {section.algorithm} needs "
                       ">= 2 responses per prompt for its group baseline; set it to 2 or more")
    if section.batch_size % section.group_size:
      raise InputError(f"config.ppo.batch_size={section.batch_size} is not a multiple of "
                       f"config.ppo.group_size={section.group_size}; make it a multiple")
  if name == "ppo" and int(section.get("online", {}).get("refresh_every", 0)) > 0 and \
      section.reward != "pm":
    raise InputError(f"config.ppo.online.refresh_every={section.online.refresh_every}: "
                     f"refreshes train a preference model, which ppo.reward={section.reward!r} "
                     "has none of; use ppo.reward=pm or refresh_every=0")
  if name == "generate_prompts" and section.min_chars > section.max_chars:
    raise InputError(f"config.generate_prompts.min_chars={section.min_chars} exceeds max_chars="
                     f"{section.max_chars}; lower min_chars or raise max_chars")
  if name == "evaluate":
    from cai_jax.runtime.stagelist import parse_list
    unknown = set(parse_list(section.judges)) - {"pm", "feedback"}
    if unknown:
      raise InputError(f"config.evaluate.judges: unknown judge(s) {sorted(unknown)}; use 'pm' "
                       "and/or 'feedback'")


def check(config, stages) -> None:
  """One InputError for the first setting out of range (module docstring)."""
  _walk(config, {"data": RULES["data"]}, "")
  _walk(config, {"frozen_dtype": one_of("", "float32", "bfloat16", "float16"),
                 "export_dtype": one_of("", "float32", "bfloat16", "float16"),
                 "hbm_gib": NONNEG_FLOAT}, "")
  for name in stages:
    if name in config:
      check_section(name, config[name])


def check_mesh(config, sections: dict) -> None:
  """`mesh.ici` fits the devices, and the training batches of `sections` ({stage:
  section}) divide its data axes."""
  from cai_jax import sharding as shd
  ici = config.get("mesh", {}).get("ici", None)
  try:
    mesh = shd.mesh_from_config(config)
  except (shd.ShardingError, TypeError, ValueError) as e:
    raise InputError(f"config.mesh.ici={ici!r}: {e}; give (data, fsdp, tensor) with one -1 "
                     "to fill the devices, e.g. (-1, 1, 1)") from None
  d = shd.batch_divisor(mesh, shd.rules_from_config(config))
  batches = {f"{s}.batch_size": sections[s].batch_size for s in ("sft", "pm") if s in sections}
  online = sections["ppo"].get("online", None) if "ppo" in sections else None
  if online is not None and int(online.refresh_every) > 0:
    batches["ppo.online.pm_batch_size"] = online.pm_batch_size
  for field, size in batches.items():
    if int(size) % d:
      raise InputError(f"config.{field}={size}: must be a "
                       f"multiple of the data-parallel size {d} of mesh {dict(mesh.shape)}")
  from cai_jax.training.accumulate import valid_counts
  for stage in ("sft", "pm", "dpo", "ppo"):
    sec = sections.get(stage, None)
    k = int(sec.get("micro_batches", 0)) if sec is not None else 0
    if not k:
      continue
    rows = int(sec.batch_size) // (int(sec.num_minibatches) if stage == "ppo" else 1)
    counts = valid_counts(rows, d if rows % d == 0 else 1)
    if k not in counts:
      what = "minibatch" if stage == "ppo" else "batch"
      raise InputError(f"config.{stage}.micro_batches={k}: the {what} of {rows} rows over "
                       f"the data-parallel size {d} splits into {', '.join(map(str, counts))}"
                       " micro-batches; use one of those, or 0 to fit the step to memory")
