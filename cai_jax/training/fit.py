"""`fit`: one supervised training phase on the generic loop, in a directory of its own.

State creation (sharded), the jitted step, the Orbax manager (train state,
data-iterator position, RNG; automatic resume), per-step metrics.jsonl and
TensorBoard, and the model config + tokenizer beside the checkpoints (so the
directory loads as a model before it has an export). The stages' supervised
runner and the evaluation judge both train through it.

Two choices are made for the devices the phase runs on:
- the layer layout (`train_layout`): the scanned one (`scan_layers`, one layer's
  gathered weights live at a time) on more than one device or for a large model,
  converted at the edges: params arrive and leave unrolled, as import, export,
  eval hooks and the sampler use them;
- the memory split (`training.memory`): the loss comes from `loss_for(cfg, split)`,
  so the split may turn on rematerialisation or an LM-head chunk, and the batch
  may run as accumulated micro-batches.
"""
from __future__ import annotations

import logging
from typing import Optional

import jax
import numpy as np

from cai_jax import models, multihost, roles, utils
from cai_jax import sharding as shd
from cai_jax.models import lora
from cai_jax.training import checkpoint, loop, memory, optim
from cai_jax.training import state as state_lib
from cai_jax.training.metrics import MetricsWriter

# Above this many parameters a single device also trains the scanned layout.
SCAN_MIN_PARAMS = 300_000_000
LAYOUT_FILE = "train_layout.json"


def train_layout(cfg, mesh, trainable_layers: int, ckpt_dir: str) -> bool:
  """Whether the phase trains the scanned layout. A run that has checkpoints keeps
  the layout they were saved in (LAYOUT_FILE), whatever devices it resumes on.
  Training only the top layers needs per-layer leaves, so keeps the unrolled one."""
  saved = utils.read_json(utils.join(ckpt_dir, LAYOUT_FILE))
  if saved is not None:
    return bool(saved["scan_layers"])
  if utils.isdir(ckpt_dir) and any(n.isdigit() for n in utils.listdir(ckpt_dir)):
    return False  # saved before layouts were recorded: unrolled
  if int(trainable_layers) >= 0 or cfg.num_layers < 2:
    return False
  return mesh.size > 1 or cfg.num_params() > SCAN_MIN_PARAMS


def record_layout(ckpt_dir: str, scan: bool) -> None:
  """Writes the layout beside the checkpoints (main host), once: a resumed run reads
  it back through `train_layout`."""
  if not utils.exists(utils.join(ckpt_dir, LAYOUT_FILE)):
    utils.write_json(utils.join(ckpt_dir, LAYOUT_FILE), {"scan_layers": bool(scan)})


def fit(phase: str, *, cfg, params, tokenizer, batches, example_batch, loss_for,
        num_steps: int, optim_config, mesh, rules, directory: str,
        checkpoints: str = "checkpoints", metrics: str = "metrics.jsonl",
        tensorboard: Optional[str] = None, keep: int = 2, every: int = 100,
        async_save: bool = True, eval_fn=None, eval_every: int = 0, log_every: int = 10,
        progress: bool = True, flops_per_token: float = 0.0, trainable_layers: int = -1,
        seed: int = 0, micro_batches: int = 0, hbm_gib: float = 0.0,
        logits_chunk: Optional[int] = None) -> loop.LoopResult:
  """loss_for(model cfg, memory.Split) -> loss fn `(params, batch, rng) -> (loss, aux)`
  for that config (its layout and remat) and the split's logits chunk (used when
  `logits_chunk` is not None: the config's). micro_batches 0 fits the step to the
  device memory (`hbm_gib`, else the runtime's); k > 0 runs k micro-batches. The
  result's params are unrolled; its `fit` records the split and layout."""
  ckpt_dir = utils.join(directory, checkpoints)
  scan = train_layout(cfg, mesh, trainable_layers, ckpt_dir)
  tcfg = cfg.replace(scan_layers=scan)
  if scan:
    params = models.stack_layers(cfg, params)
  trainable = None
  if lora.KEY in params:  # LoRA: the adapters (and a score head) train, the base is read
    trainable = lora.trainable_mask(params)
  elif int(trainable_layers) >= 0:
    trainable = optim.trainable_mask(params, int(trainable_layers), train_embeddings=False)
  tx = optim.make_optimizer(optim_config, total_steps=num_steps, trainable=trainable)
  st = state_lib.create_train_state(params, tx, tcfg, mesh, rules)
  del params
  schedule = optim.make_schedule(optim_config, num_steps)

  def build(split: memory.Split):
    return loop.make_train_step(loss_for(tcfg.replace(remat=split.remat), split), tx, st, mesh,
                                example_batch, trainable, rules=rules, lr_schedule=schedule,
                                micro_batches=split.micro_batches)

  def measure(split: memory.Split) -> int:
    return memory.compiled_bytes(build(split).lower(st, example_batch, rng_example).compile())

  rng_example = jax.random.PRNGKey(0)
  rows = int(np.shape(next(iter(example_batch.values())))[0])
  chosen = memory.choose(
      measure, rows, shd.batch_divisor(mesh, rules), memory.device_budget(hbm_gib),
      memory.Split(remat=bool(cfg.remat), logits_chunk=int(logits_chunk or 0)),
      chunked=logits_chunk is not None, fixed_micro_batches=int(micro_batches), name=phase)
  logging.info("%s; %s layers", chosen.line(phase), "scanned" if scan else "unrolled")
  step_fn = build(chosen.split)
  unstack = jax.jit(lambda p: models.unstack_layers(tcfg, p)) if scan else (lambda p: p)
  if eval_fn is not None and scan:
    eval_fn = (lambda f: lambda p, step: f(unstack(p), step))(eval_fn)
  if multihost.is_main():
    roles.prepare_checkpoint_dir(ckpt_dir, cfg, tokenizer)
    record_layout(ckpt_dir, scan)
  multihost.sync(f"{phase}: checkpoint directory prepared")
  mngr = checkpoint.Manager(ckpt_dir, max_to_keep=int(keep), save_interval_steps=int(every),
                            async_save=bool(async_save))
  writer = MetricsWriter(utils.join(directory, metrics),
                         utils.join(directory, tensorboard) if tensorboard else None,
                         resume_step=mngr.latest_step() or 0)
  try:
    res = loop.train(step_fn=step_fn, state=st, batches=batches, mesh=mesh,
                     num_steps=int(num_steps), rng=jax.random.PRNGKey(seed), manager=mngr,
                     eval_fn=eval_fn, eval_every=int(eval_every), metrics_writer=writer,
                     flops_per_token=flops_per_token, log_every=int(log_every), desc=phase,
                     progress=bool(progress), rules=rules)
    res.state = res.state.replace(params=unstack(res.state.params))
    res.fit = dict(chosen.record(), scan_layers=scan)
    return res
  finally:
    mngr.close()
    writer.close()
