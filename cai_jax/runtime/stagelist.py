"""The stages, their canonical order, and list-valued config fields.

List fields are tuples in the configs (`config.stages = ("revise", "sft")`);
from the command line ml_collections passes `--config.stages=revise,sft` as a
one-element tuple, so each element is also split on commas here.
"""
from __future__ import annotations

from cai_jax.utils import InputError

# Canonical order; config.stages picks a subset and they always run in this order.
# generate_prompts is optional (off unless listed): it grows the red-team prompt set.
# dpo is optional too: RL-CAI from the labels without a PM (instead of, or beside, ppo).
STAGES = ("generate_prompts", "revise", "sft", "label", "pm", "ppo", "dpo", "evaluate")
DEFAULT_STAGES = ("revise", "sft", "label", "pm", "ppo", "evaluate")
# Stage name -> module exposing default_config(), settings() and run(config, workdir).
STAGE_MODULES = {
    "generate_prompts": "cai_jax.stages.generate_prompts",
    "revise": "cai_jax.stages.revise",
    "sft": "cai_jax.stages.sft",
    "label": "cai_jax.stages.label",
    "pm": "cai_jax.stages.preference",
    "ppo": "cai_jax.stages.ppo",
    "dpo": "cai_jax.stages.dpo",
    "evaluate": "cai_jax.stages.evaluate",
}


def parse_list(value) -> list[str]:
  """A tuple/list of names or a comma-separated string -> the non-empty names."""
  items = [value] if isinstance(value, str) else list(value or ())
  return [s.strip() for x in items for s in str(x).split(",") if s.strip()]


def parse_stages(value, field: str = "config.stages") -> list[str]:
  """Validated stage names in canonical order."""
  names = parse_list(value)
  for n in names:
    if n not in STAGES:
      raise InputError(f"{field}: unknown stage {n!r}; choose from {','.join(STAGES)}")
  return [s for s in STAGES if s in names]


def later_stages(name: str) -> list[str]:
  return list(STAGES[STAGES.index(name):])
