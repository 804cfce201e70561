"""StageContext: what every stage needs from the run, written once.

A stage builds one with `StageContext(config, workdir, NAME, defaults)` and gets
its section (defaults merged), its directory, the roles it loads, the one
conversation encoder, the settings snapshot (`begin`), the checkpoint manager,
metrics writer and export, and the DONE marker (`finish`). Multi-host rules
live here too: every host takes part in gathers and collectives, the main host
alone writes files, and DONE is written last, after every output.
"""
from __future__ import annotations

import copy
import functools
import os
import tempfile
from typing import Optional, Sequence

from absl import logging
import ml_collections

from cai_jax import multihost, roles, utils
from cai_jax.runtime import checks, provenance
from cai_jax.training.metrics import MetricsWriter
from cai_jax.text.conversation import ConversationEncoder
from cai_jax.utils import InputError

# Which earlier stage's export each role defaults to.
ROLE_STAGE = {"policy": "sft", "pm": "pm", "rl_policy": "ppo"}


def section(config, name: str, defaults: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The stage's config section over its defaults; an unknown field is an InputError."""
  base = defaults
  sec = config.get(name, None) if hasattr(config, "get") else None
  if sec is not None:
    for k in sec.keys():
      if k not in base:
        raise InputError(f"config.{name}.{k}: unknown field; known: {sorted(base.keys())}")
      base[k] = sec[k]
  return base


def configured_stages(config) -> tuple:
  from cai_jax.runtime.stagelist import parse_stages
  try:
    return tuple(parse_stages(config.get("stages", ()) or ()))
  except InputError:
    return ()


class StageContext:

  def __init__(self, config, workdir: str, name: str,
               defaults: Optional[ml_collections.ConfigDict] = None):
    self.config, self.name = config, name
    self.workdir = utils.resolve_dir(workdir)
    self.dir = utils.join(self.workdir, name)
    self.section = section(config, name, defaults) if defaults is not None else None
    if self.section is not None:  # a stage run alone is checked as the pipeline checks it
      checks.check_section(name, self.section)
      checks.check_mesh(config, {name: self.section})
    self.seed = int(config.get("seed", 0) or 0)
    self.dtype = config.get("dtype", None) or None
    # Models the stage only reads (reference, reward, feedback) may be held in another dtype.
    self.frozen_dtype = config.get("frozen_dtype", None) or None
    self.fmt = str(config.get("prompt_format", "chat") or "chat")

  @property
  def is_main(self) -> bool:
    return multihost.is_main()

  # ------------------------------------------------------------------ paths
  def path(self, *parts) -> str:
    return utils.join(self.dir, *parts)

  def stage_dir(self, name: str) -> str:
    return utils.join(self.workdir, name)

  def done(self) -> Optional[dict]:
    """Process 0's DONE summary (hosts need not share its disk), or None."""
    return multihost.from_main(utils.done_info(self.dir))

  # ------------------------------------------------------------------ lifecycle
  def begin(self, settings: dict) -> None:
    """Records the stage's settings (main host) or refuses a resume whose settings
    differ. Call once the stage's inputs have loaded."""
    multihost.check_same(settings, f"{self.name} settings")
    provenance.check(self.dir, self.name, settings)
    if multihost.is_main():
      utils.makedirs(self.dir)
      provenance.record(self.dir, settings)

  def finish(self, summary: dict) -> dict:
    """DONE, after every host's outputs are complete; returns the summary (paths in
    the workdir written relative to it, as $WORKDIR/...)."""
    summary = provenance.relativize(summary, self.workdir)
    multihost.sync(f"{self.name}: outputs complete")
    if multihost.is_main():
      utils.mark_done(self.dir, summary)
      if not bool(self.config.get("keep_checkpoints_when_done", False)):
        self._drop_checkpoints()
    multihost.sync(f"{self.name}: DONE written")
    return summary

  def _drop_checkpoints(self) -> None:
    """A finished stage is skipped by every later run and read through its exports,
    so its Orbax checkpoints (train and optimizer state) only hold disk. Deleted
    after DONE: an interruption here leaves a finished stage with some of them."""
    for name in utils.listdir(self.dir):
      path = utils.join(self.dir, name)
      if name.startswith("checkpoints") and utils.isdir(path):
        utils.remove(path)
        logging.info("%s: finished; removed %s (keep_checkpoints_when_done=True keeps them)",
                     self.name, path)

  # ------------------------------------------------------------------ roles
  def role_spec(self, role: str, explicit: str = "") -> str:
    """The model a role loads: `explicit` if set, else the one default rule.

    initial: config.model. feedback: config.feedback_model, else config.model.
    policy / pm / rl_policy: the directory of the stage that makes them (sft, pm,
    ppo) when that stage is part of this run or has run in this workdir; else
    config.model for the policy, and an error for the others.
    """
    if explicit:
      return str(explicit)
    model = str(self.config.get("model", "") or "")
    if role == "initial":
      return model
    if role == "feedback":
      return str(self.config.get("feedback_model", "") or "") or model
    stage = ROLE_STAGE[role]
    d = self.stage_dir(stage)
    if stage in configured_stages(self.config) or utils.exists(d):
      return d
    if role == "policy":
      logging.info("%s: no %s stage in this run or workdir; the policy is config.model=%s",
                   self.name, stage, model)
      return model
    raise InputError(f"{d}: not found; run the {stage} stage first (add it to config.stages) "
                     f"or name a model for the {role} in config.{self.name}")

  def load(self, spec: str, heads: Sequence[str] = ("lm",), field: str = "model",
           seed_offset: int = 0):
    """(cfg, params, tokenizer) of a model spec (roles.load with the run's seed/dtype)."""
    return roles.load(spec, seed=self.seed + seed_offset, dtype=self.dtype, heads=tuple(heads),
                      field=field)

  def load_policy(self, explicit: str, field: str):
    """(spec, cfg, params, tokenizer) of the policy role: a language model whose
    params keep the LM head and nothing else."""
    from cai_jax import models
    spec = self.role_spec("policy", explicit)
    cfg, params, tok = self.load(spec, field=field)
    if "lm" not in models.heads_of(cfg, params):
      raise InputError(f"{spec}: the policy has no LM head; point {field} at a language model")
    return spec, cfg, models.drop_heads(params, ("lm",)), tok

  def encoder(self, tokenizer, system: Optional[str] = None) -> ConversationEncoder:
    return ConversationEncoder(tokenizer, self.fmt, system)

  # ------------------------------------------------------------------ outputs
  def write_text(self, name: str, text: str, once: bool = False) -> None:
    """A file of the stage's output, from the main host. `once`: an existing file
    must hold the same text (finished output is never overwritten)."""
    if multihost.is_main():
      (utils.write_once if once else utils.atomic_write_text)(self.path(name), text)

  def write_jsonl(self, name: str, records, once: bool = False) -> None:
    self.write_text(name, utils.jsonl_text(records), once)

  def checkpoint_manager(self, subdir: str = "checkpoints", *, keep: int = 2, every: int = 1,
                         async_save: bool = True, cfg=None, tokenizer=None):
    """The stage's Orbax manager; with cfg/tokenizer the directory also loads as a model."""
    from cai_jax.training import checkpoint
    d = self.path(subdir)
    if cfg is not None and multihost.is_main():
      roles.prepare_checkpoint_dir(d, cfg, tokenizer)
    multihost.sync(f"{self.name}: {subdir} prepared")
    return checkpoint.Manager(d, max_to_keep=int(keep), save_interval_steps=int(every),
                              async_save=bool(async_save))

  def metrics(self, name: str = "metrics.jsonl", tensorboard: bool = True, tb_subdir: str = "tb",
              resume_step: int = 0, key: str = "step") -> MetricsWriter:
    return MetricsWriter(self.path(name), self.path(tb_subdir) if tensorboard else None,
                         resume_step=resume_step, key=key)

  def generation_config(self, cfg, tokenizer) -> dict:
    """generation_config.json of an export: the tokens that end a response as the
    stages sample it (EOS, and the chat template's end-of-turn token when it is one
    token), so `generate` in transformers stops where the project's sampler does."""
    from cai_jax.sampling import eos_ids_of
    stops = set(eos_ids_of(cfg, tokenizer))
    eot = self.encoder(tokenizer).end_of_turn.strip()
    if eot:
      ids = tokenizer(eot, add_special_tokens=False)["input_ids"]
      if len(ids) == 1:
        stops.add(int(ids[0]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else cfg.pad_token_id
    out = {"eos_token_id": sorted(stops)}
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None:
      out["bos_token_id"] = int(bos)
    if pad is not None:
      out["pad_token_id"] = int(pad)
    return out

  def _score_tokenizer(self, cfg, tokenizer):
    """(tokenizer, pad id) for a scoring model's export. transformers'
    AutoModelForSequenceClassification reads the score at each row's last token that
    is not the pad, and scored conversations end with the end-of-turn token, which
    is often the tokenizer's pad (SmolLM2): then another special token pads."""
    last = int(self.encoder(tokenizer).conversation([{"role": "user", "content": "a"}],
                                                    "b").ids[-1])
    for pad in (tokenizer.pad_token_id, cfg.pad_token_id, tokenizer.bos_token_id,
                tokenizer.unk_token_id, 0, 1):
      if pad is not None and int(pad) != last:
        break
    pad = int(pad)
    if tokenizer.pad_token_id != pad:
      tokenizer = copy.deepcopy(tokenizer)
      tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad)
    return tokenizer, pad

  def export(self, cfg, params, tokenizer, name: str = "final") -> str:
    """HF export of `params` into the stage's `name`/ directory: gathered on every
    host, written by the main host under a temporary name, then renamed."""
    from cai_jax import models
    host = multihost.to_host(params)
    gen = self.generation_config(cfg, tokenizer)
    pad = None
    if "score_kernel" in host and tokenizer is not None:
      tokenizer, pad = self._score_tokenizer(cfg, tokenizer)
      gen["pad_token_id"] = pad
    save = functools.partial(models.save_pretrained, cfg, host, tokenizer=tokenizer,
                             generation=gen, score_pad_id=pad,
                             dtype=self.config.get("export_dtype", "") or None)
    return self._write_dir(name, save)

  def export_adapter(self, cfg, params, base_model: str, name: str = "adapter") -> str:
    """A LoRA model's adapters in the PEFT layout, in the stage's `name`/ directory
    (`base_model`: what the adapters apply to, recorded in adapter_config.json)."""
    from cai_jax import models
    from cai_jax.models import lora
    adapters = {lora.KEY: params[lora.KEY]}  # gathered alone, not the base
    save = functools.partial(models.save_peft_adapter, cfg, multihost.to_host(adapters),
                             base_model=base_model,
                             dtype=self.config.get("export_dtype", "") or None)
    return self._write_dir(name, save)

  def _write_dir(self, name: str, save) -> str:
    """`save(dir)` into the stage's `name`/ directory: by the main host under a
    temporary name, then renamed."""
    out = self.path(name)
    if multihost.is_main():
      if utils.is_url(out):
        with tempfile.TemporaryDirectory() as tmp:
          save(os.path.join(tmp, name))
          utils.copy_dir_to(os.path.join(tmp, name), out)
      else:
        tmp = out + ".tmp"
        utils.remove(tmp)
        save(tmp)
        utils.remove(out)
        os.replace(tmp, out)
    multihost.sync(f"{self.name}: exported {name}")
    return out
