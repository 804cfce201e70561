"""TrainState and its sharded creation.

The state is a pytree of (step, params, opt_state); the jitted step maps it to
the next state. Optimizer slots are created by a jitted `tx.init` on the
already-sharded params, so they inherit the params' shardings.
"""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from cai_jax import sharding as shd


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # int32 scalar: optimizer steps taken (micro-steps with accumulation)
  params: Any
  opt_state: Any


def create_train_state(params, tx: optax.GradientTransformation, cfg=None, mesh=None,
                       rules=shd.DEFAULT_RULES) -> TrainState:
  """Places params on the mesh (by their logical axes) and builds optimizer slots."""
  if mesh is not None and cfg is not None:
    params = shd.shard_params(params, cfg, mesh, rules)
  else:
    params = jax.tree_util.tree_map(jnp.asarray, params)
  # Moments take their params' shardings (plain jit(tx.init) replicates them).
  opt_state = shd.init_opt_state(tx, params, mesh)
  step = jnp.zeros((), jnp.int32)
  if mesh is not None:
    step = jax.device_put(step, shd.replicated(mesh))
    # Optimizer leaves whose shape matches no param (counts, scalars) are replicated.
    opt_state = jax.tree_util.tree_map(
        lambda x: x if getattr(x, "ndim", 0) and len(x.sharding.device_set) == mesh.size
        else jax.device_put(x, shd.replicated(mesh)), opt_state)
  return TrainState(step=step, params=params, opt_state=opt_state)


def state_shardings(state: TrainState):
  return jax.tree_util.tree_map(lambda x: x.sharding, state)


def abstract_state(state: TrainState):
  """ShapeDtypeStructs with shardings: the restore target of a checkpoint."""
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def to_host(tree):
  """Numpy copy of a (possibly multi-host sharded) tree; call on every process."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    tree = multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


def tree_bytes(tree) -> int:
  """Bytes of every array in a tree (global sizes, whatever the sharding)."""
  import numpy as np
  return int(sum(int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
                 for x in jax.tree_util.tree_leaves(tree) if hasattr(x, "shape")))


def per_device_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded arrays or ShapeDtypeStructs (a
  leaf without a sharding counts whole)."""
  import numpy as np
  total = 0
  for x in jax.tree_util.tree_leaves(tree):
    if not hasattr(x, "shape"):
      continue
    sh = getattr(x, "sharding", None)
    shape = sh.shard_shape(x.shape) if sh is not None else x.shape
    total += int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
  return total
