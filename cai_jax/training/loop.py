"""The one generic train loop: jitted sharded step + checkpointed iteration.

`make_train_step(loss_fn, tx, ...)` builds the pure step
`(state, batch, rng) -> (state, metrics)`, jitted with explicit shardings and
the state donated. `train(...)` drives it: automatic resume from the stage's
latest checkpoint (train state, RNG, data-iterator position), metrics fetched
one step late so the host never stalls the device, eval hooks on a schedule,
TensorBoard scalars, a progress bar with tokens/s and MFU, and a NaN/Inf guard
that stops before a bad state is ever saved.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from cai_jax import interrupts
from cai_jax import sharding as shd
from cai_jax.training import accumulate
from cai_jax.training import flops as flops_lib
from cai_jax.training.state import TrainState, abstract_state, state_shardings
from cai_jax.utils import InputError

LossFn = Callable[[Any, dict, jax.Array], tuple]  # (params, batch, rng) -> (loss, aux dict)


class TrainingDivergedError(RuntimeError):
  """A non-finite loss or gradient; the last good checkpoint is kept."""


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, state: TrainState,
                    mesh, batch_example: dict, trainable=None, donate: bool = True,
                    rules=shd.DEFAULT_RULES, lr_schedule=None, micro_batches: int = 1):
  """Jitted `(state, batch, rng) -> (state, metrics)` with explicit shardings.

  `trainable`: optional bool tree; frozen params enter the loss behind
  stop_gradient so XLA skips their backward pass entirely. The loss is traced
  under `sharding.activation_sharding`, so the model's activations stay on the
  batch axes. `lr_schedule` (step -> rate) adds the step's learning rate to the metrics.
  `micro_batches` k > 1 accumulates the gradient over k micro-batches of the batch
  (`accumulate`), weighted as `accumulate.weighted` marked the loss: the same update
  as one pass over the batch, with one micro-batch's activations in memory.
  """
  def f(params, batch, rng):
    if trainable is not None:
      params = jax.tree_util.tree_map(
          lambda p, t: p if t else jax.lax.stop_gradient(p), params, trainable)
    return loss_fn(params, batch, rng)
  weight_of, sum_keys = accumulate.weighting(loss_fn)
  grad_fn = accumulate.value_and_grad(f, int(micro_batches), weight_of=weight_of,
                                      sum_keys=sum_keys, mesh=mesh, rules=rules)

  @shd.activation_sharding(mesh, rules)
  def step(st: TrainState, batch, rng):
    (loss, aux), grads = grad_fn(st.params, batch, rng)
    # Gradients take their parameters' shardings at once (a reduce-scatter on
    # FSDP axes), rather than staying whole until the optimizer reads them.
    if mesh.size > 1:
      grads = jax.lax.with_sharding_constraint(grads, param_sh)
    updates, opt_state = tx.update(grads, st.opt_state, st.params)
    params = optax.apply_updates(st.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), **aux}
    if lr_schedule is not None:
      metrics["learning_rate"] = lr_schedule(st.step)
    return TrainState(step=st.step + 1, params=params, opt_state=opt_state), metrics

  st_sh = state_shardings(state)
  param_sh = st_sh.params
  b_sh = jax.tree_util.tree_map(lambda x: shd.batch_sharding(mesh, max(np.ndim(x), 1), rules),
                                batch_example)
  rep = shd.replicated(mesh)
  return jax.jit(step, in_shardings=(st_sh, b_sh, rep), out_shardings=(st_sh, rep),
                 donate_argnums=(0,) if donate else ())


@dataclasses.dataclass
class LoopResult:
  state: TrainState
  step: int
  history: list            # per step: {"step", "loss", ...} host floats
  evals: list              # per eval: {"step", ...}
  resumed_from: Optional[int]
  stopped_early: bool
  fit: Optional[dict] = None  # how the step was fitted to memory (`memory.Fit.record`)


def _finite(m: dict) -> bool:
  return all(np.all(np.isfinite(np.asarray(v))) for v in m.values())


def train(*, step_fn, state: TrainState, batches, mesh, num_steps: int, rng,
          manager=None, eval_fn: Optional[Callable] = None, eval_every: int = 0,
          metrics_writer=None, flops_per_token: float = 0.0, log_every: int = 1,
          stop_after: Optional[int] = None, desc: str = "train", progress: bool = True,
          rules=shd.DEFAULT_RULES) -> LoopResult:
  """Runs `step_fn` until `num_steps` (resuming from `manager` if it has a checkpoint).

  batches: iterator of host numpy dicts with get_state()/set_state().
  eval_fn(params, step) -> dict of floats, run every `eval_every` steps and at the end.
  stop_after: stop (as if killed) once this step is reached; for tests and
  time-sliced jobs. After SIGTERM/SIGINT (`interrupts`) the step reached is saved
  and `interrupts.Interrupted` raised. flops_per_token: training FLOPs per token for MFU.
  metrics_writer: a writer with `write(step, scalars, prefix="")` (runtime.MetricsWriter):
  every step's scalars, and each eval's under "eval/".
  """
  rng = jnp.asarray(rng)
  resumed = None
  if manager is not None and manager.latest_step() is not None:
    resumed = manager.latest_step()
    restored, data = manager.restore(resumed, target={"train": abstract_state(state)})
    # The key travels as JSON: a host-local array cannot be saved by a multi-host Orbax save.
    state, rng = restored["train"], jnp.asarray(np.asarray(data["rng"], np.uint32))
    try:
      batches.set_state(data["iterator"])
    except (ValueError, KeyError) as e:
      raise InputError(f"{manager.directory}/{resumed}: data-iterator state does not match this "
                       f"run's data ({e}); use a fresh workdir or the original data") from None
    logging.info("%s: resumed from step %d", desc, resumed)
  start = int(jax.device_get(state.step))
  peak = flops_lib.peak_flops() if flops_per_token else 0.0
  history, evals, pending = [], [], []
  bar = tqdm(total=num_steps, initial=start, desc=desc, disable=not progress, dynamic_ncols=True)
  t_last, tok_since = time.perf_counter(), 0
  t_step = t_last

  def drain(keep: int = 0):
    nonlocal t_last, tok_since, t_step
    while len(pending) > keep:
      s, m, ntok = pending.pop(0)
      m = {k: np.asarray(v) for k, v in jax.device_get(m).items()}
      if not _finite(m):
        bad = ", ".join(k for k, v in m.items() if not np.all(np.isfinite(v)))
        last = manager.latest_step() if manager is not None else None
        where = (f"last good checkpoint: step {last} in {manager.directory}" if last is not None
                 else "no checkpoint was saved")
        raise TrainingDivergedError(f"{desc}: non-finite {bad} at step {s}; stopped, {where}; "
                                    "lower the learning rate or check the data")
      rec = {"step": s, **{k: float(v) for k, v in m.items() if np.ndim(v) == 0}}
      history.append(rec)
      tok_since += ntok
      # Every step's throughput (from when its metrics arrive; the first step's includes
      # compilation); the progress bar shows the mean since its last update.
      now = time.perf_counter()
      rec["tokens_per_s"] = ntok / max(now - t_step, 1e-9)
      t_step = now
      if peak:
        rec["mfu"] = rec["tokens_per_s"] * flops_per_token / peak
      if s % log_every == 0 or s == num_steps:
        tps = tok_since / max(now - t_last, 1e-9)
        t_last, tok_since = now, 0
        post = {"loss": f"{rec['loss']:.4f}", "tok/s": f"{tps:.0f}"}
        if peak:
          post["mfu"] = f"{100 * tps * flops_per_token / peak:.1f}%"
        bar.set_postfix(post, refresh=False)
      if metrics_writer is not None:
        metrics_writer.write(s, rec)
      bar.update(1)

  def save(force: bool):
    drain()  # never save a state whose loss was not checked
    manager.save(step, {"train": state},
                 {"iterator": batches.get_state(), "step": step,
                  "rng": np.asarray(jax.device_get(rng)).tolist()}, force=force)

  stopped = False
  step = saved = start
  try:
    while step < num_steps:
      host = next(batches)
      # Tokens of compute per step: every row of every token array (A and B for pairs).
      ntok = int(sum(np.size(v) for k, v in host.items() if k.startswith("tokens")))
      batch = shd.shard_batch(host, mesh, rules)
      state, metrics = step_fn(state, batch, jax.random.fold_in(rng, step))
      step += 1
      pending.append((step, metrics, ntok))
      drain(keep=1)  # fetch the previous step's metrics while this one runs
      final = step == num_steps
      if manager is not None and (final or manager.should_save(step)):
        save(force=final)
        saved = step
      if eval_fn is not None and ((eval_every and step % eval_every == 0) or final):
        drain()
        ev = {"step": step, **eval_fn(state.params, step)}
        evals.append(ev)
        logging.info("%s eval @%d: %s", desc, step, {k: round(v, 4) for k, v in ev.items()
                                                    if isinstance(v, float)})
        if metrics_writer is not None:
          metrics_writer.write(step, ev, prefix="eval/")
      if stop_after is not None and step >= stop_after and not final:
        stopped = True
        break
      signum = interrupts.requested_at(step)
      if signum is not None and not final:
        if manager is not None and saved != step:
          save(force=True)
        raise interrupts.Interrupted(signum, f"{desc} at step {step}")
    drain()
  finally:
    bar.close()
    if manager is not None:
      manager.wait()
    if metrics_writer is not None:
      metrics_writer.flush()
  return LoopResult(state, step, history, evals, resumed, stopped)


def make_eval_fn(metric_fn, batches: list, mesh, weight_key: Optional[str] = None,
                 rules=shd.DEFAULT_RULES):
  """eval_fn(params, step) -> mean of `metric_fn(params, batch)` over fixed batches.

  metric_fn returns a dict of scalars; with `weight_key` each batch's means are
  weighted by that entry (e.g. the number of loss tokens).
  """
  if not batches:
    return None
  jf = jax.jit(metric_fn)
  placed = [shd.shard_batch(b, mesh, rules) for b in batches]

  def eval_fn(params, step):
    del step
    tot, wsum = {}, 0.0
    for b in placed:
      m = {k: float(v) for k, v in jax.device_get(jf(params, b)).items()}
      w = m.get(weight_key, 1.0) if weight_key else 1.0
      wsum += w
      for k, v in m.items():
        tot[k] = tot.get(k, 0.0) + w * v
    return {k: v / max(wsum, 1e-9) for k, v in tot.items() if k != weight_key}
  return eval_fn
