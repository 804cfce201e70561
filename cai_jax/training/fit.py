"""`fit`: one supervised training phase on the generic loop, in a directory of its own.

State creation (sharded), the jitted step, the Orbax manager (train state,
data-iterator position, RNG; automatic resume), per-step metrics.jsonl and
TensorBoard, and the model config + tokenizer beside the checkpoints (so the
directory loads as a model before it has an export). The stages' supervised
runner and the evaluation judge both train through it.
"""
from __future__ import annotations

from typing import Optional

import jax

from cai_jax import multihost, roles, utils
from cai_jax.training import checkpoint, loop, optim
from cai_jax.training import state as state_lib
from cai_jax.training.metrics import MetricsWriter


def fit(phase: str, *, cfg, params, tokenizer, batches, example_batch, loss_fn,
        num_steps: int, optim_config, mesh, rules, directory: str,
        checkpoints: str = "checkpoints", metrics: str = "metrics.jsonl",
        tensorboard: Optional[str] = None, keep: int = 2, every: int = 100,
        async_save: bool = True, eval_fn=None, eval_every: int = 0, log_every: int = 10,
        progress: bool = True, flops_per_token: float = 0.0, trainable_layers: int = -1,
        seed: int = 0) -> loop.LoopResult:
  trainable = None
  if int(trainable_layers) >= 0:
    trainable = optim.trainable_mask(params, int(trainable_layers), train_embeddings=False)
  tx = optim.make_optimizer(optim_config, total_steps=num_steps, trainable=trainable)
  st = state_lib.create_train_state(params, tx, cfg, mesh, rules)
  step_fn = loop.make_train_step(loss_fn, tx, st, mesh, example_batch, trainable, rules=rules,
                                 lr_schedule=optim.make_schedule(optim_config, num_steps))
  ckpt_dir = utils.join(directory, checkpoints)
  if multihost.is_main():
    roles.prepare_checkpoint_dir(ckpt_dir, cfg, tokenizer)
  multihost.sync(f"{phase}: checkpoint directory prepared")
  mngr = checkpoint.Manager(ckpt_dir, max_to_keep=int(keep), save_interval_steps=int(every),
                            async_save=bool(async_save))
  writer = MetricsWriter(utils.join(directory, metrics),
                         utils.join(directory, tensorboard) if tensorboard else None,
                         resume_step=mngr.latest_step() or 0)
  try:
    return loop.train(step_fn=step_fn, state=st, batches=batches, mesh=mesh,
                      num_steps=int(num_steps), rng=jax.random.PRNGKey(seed), manager=mngr,
                      eval_fn=eval_fn, eval_every=int(eval_every), metrics_writer=writer,
                      flops_per_token=flops_per_token, log_every=int(log_every), desc=phase,
                      progress=bool(progress), rules=rules)
  finally:
    mngr.close()
    writer.close()
