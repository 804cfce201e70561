"""Gradient accumulation inside one jitted step: a batch as k micro-batches.

`value_and_grad(f, k, ...)` computes what `jax.value_and_grad(f, has_aux=True)`
computes on the whole batch, by scanning over k micro-batches and summing their
gradients, so only one micro-batch's activations are live at a time. The step
keeps the config's batch (and so its optimizer trajectory); only the memory
changes. Losses that are means over tokens (SFT cross-entropy, PPO's masked
means) combine exactly when each micro-batch is weighted by its token count
(`weight_of`); means over rows take equal weights, as the micro-batches are equal.

Micro-batch i holds rows i, i+k, i+2k, ...: a batch split over the batch axes in
contiguous blocks then gives every device the same share of every micro-batch,
so no rows move between devices.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp

from cai_jax import sharding as shd


def split(batch, k: int):
  """(B, ...) leaves -> (k, B/k, ...), micro-batch i = rows i::k."""
  def one(x):
    b = x.shape[0]
    if b % k:
      raise ValueError(f"batch of {b} rows does not split into {k} micro-batches")
    return jnp.swapaxes(x.reshape((b // k, k) + x.shape[1:]), 0, 1)
  return jax.tree_util.tree_map(one, batch)


def valid_counts(batch_size: int, divisor: int = 1) -> list:
  """Micro-batch counts k for which every micro-batch spreads evenly over `divisor`
  devices of the batch axes: k divides the batch and divisor divides B/k."""
  return [k for k in range(1, batch_size + 1)
          if batch_size % k == 0 and (batch_size // k) % max(divisor, 1) == 0]


def value_and_grad(f: Callable, k: int, argnums=0,
                   weight_of: Optional[Callable] = None, sum_keys: Sequence[str] = (),
                   mesh=None, rules=shd.DEFAULT_RULES):
  """`(args..., batch, *rest) -> ((loss, aux), grads)` over k micro-batches.

  f(*params, batch, *rest) -> (loss, aux dict of scalars); `argnums` as in
  jax.value_and_grad over the leading parameter arguments, and the batch is the
  argument after them. weight_of(micro_batch) -> scalar weight (None: equal
  weights); the loss, gradients and aux are weight-averaged, except `sum_keys`,
  which are summed (counts). With every weight 0 the result is 0, as the whole
  batch's masked mean is. Gradients accumulate in float32.
  """
  grad_fn = jax.value_and_grad(f, argnums=argnums, has_aux=True)
  if k == 1:
    return grad_fn
  nparams = (argnums if isinstance(argnums, int) else max(argnums)) + 1

  def constrain(mb):
    if mesh is None or mesh.size == 1:
      return mb
    def one(x):
      if x.shape[0] % shd.batch_divisor(mesh, rules):
        return x
      return jax.lax.with_sharding_constraint(x, shd.batch_sharding(mesh, x.ndim, rules))
    return jax.tree_util.tree_map(one, mb)

  def run(*args):
    params, batch, rest = args[:nparams], args[nparams], args[nparams + 1:]
    micro = split(batch, k)

    def body(acc, mb):
      mb = constrain(mb)
      (loss, aux), grads = grad_fn(*params, mb, *rest)
      w = (jnp.asarray(weight_of(mb), jnp.float32) if weight_of is not None
           else jnp.ones((), jnp.float32))
      scale = lambda t: jax.tree_util.tree_map(  # noqa: E731
          lambda x: jnp.asarray(x, jnp.float32) * w, t)
      summed = {key: jnp.asarray(aux[key], jnp.float32) for key in sum_keys}
      part = (scale(loss), scale({key: v for key, v in aux.items() if key not in summed}),
              summed, scale(grads), w)
      return jax.tree_util.tree_map(jnp.add, acc, part), None

    mb0 = jax.tree_util.tree_map(lambda x: x[0], micro)
    shapes = jax.eval_shape(lambda: grad_fn(*params, mb0, *rest))
    zero = lambda t: jax.tree_util.tree_map(  # noqa: E731
        lambda s: jnp.zeros(s.shape, jnp.float32), t)
    (loss_s, aux_s), grads_s = shapes
    init = (zero(loss_s), zero({key: v for key, v in aux_s.items() if key not in sum_keys}),
            zero({key: aux_s[key] for key in sum_keys}), zero(grads_s),
            jnp.zeros((), jnp.float32))
    (loss, aux, summed, grads, total), _ = jax.lax.scan(body, init, micro)
    inv = 1.0 / jnp.maximum(total, 1e-30)
    norm = lambda t, like: jax.tree_util.tree_map(  # noqa: E731
        lambda x, s: (x * inv).astype(s.dtype), t, like)
    aux = dict(norm(aux, {key: v for key, v in aux_s.items() if key not in sum_keys}),
               **{key: summed[key].astype(aux_s[key].dtype) for key in sum_keys})
    return (norm(loss, loss_s), aux), norm(grads, grads_s)
  return run


def weighted(loss_fn: Callable, weight_of: Callable, sum_keys: Sequence[str] = ()) -> Callable:
  """Marks a loss `(params, batch, rng) -> (loss, aux)` as a mean over what
  `weight_of(batch)` counts (tokens), so that micro-batches combine exactly;
  `sum_keys` are aux counts. Unmarked losses are means over rows."""
  loss_fn.micro_weight = weight_of
  loss_fn.micro_sum_keys = tuple(sum_keys)
  return loss_fn


def weighting(loss_fn: Callable) -> tuple:
  """(weight_of, sum_keys) that `weighted` gave `loss_fn`, else (None, ())."""
  return getattr(loss_fn, "micro_weight", None), getattr(loss_fn, "micro_sum_keys", ())
