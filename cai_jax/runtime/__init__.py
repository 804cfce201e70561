"""The stage runtime: the seams between stages, written once.

  context.StageContext   section, directories, roles, encoder, settings snapshot,
                         checkpoint manager, metrics writer, export, DONE
  runners                chunked generation (revise, label, generate_prompts) and
                         supervised training (sft, pm)
  provenance             per-stage settings snapshots and the refusal of changed ones
  stagelist              the stages, their order, list-valued config fields
  console                terminal vs log-file output

Imports flow downward: models -> sampling / training / rl / evaluation -> this
runtime -> stages -> pipeline / main.
"""
from cai_jax.runtime.context import StageContext, section
from cai_jax.runtime.provenance import stage_settings
from cai_jax.runtime.stagelist import (DEFAULT_STAGES, STAGE_MODULES, STAGES, parse_list,
                                       parse_stages)
