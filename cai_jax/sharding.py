"""Sharding is configuration: mesh from config, logical-axis rules, sharded init.

Mesh axes are ("data", "fsdp", "tensor"). Models name logical axes only
("vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "norm"); the rules
below (kept in config as `logical_axis_rules`) map them to mesh axes. A logical
axis whose size does not divide the mesh axes it maps to is replicated instead,
so e.g. SmolLM2's 9 heads still run on tensor=2.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES: tuple = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("length", None),
    ("cache_length", None),
)


class ShardingError(ValueError):
  pass


def mesh_shape(parallelism: Sequence[int], num_devices: int) -> tuple:
  """Resolves one -1 entry ("fill") so the product equals num_devices."""
  dims = list(int(x) for x in parallelism)
  if len(dims) != len(MESH_AXES):
    raise ShardingError(f"mesh parallelism needs {len(MESH_AXES)} entries "
                        f"(data, fsdp, tensor), got {dims}")
  if dims.count(-1) > 1:
    raise ShardingError(f"at most one mesh axis may be -1 (fill), got {dims}")
  known = math.prod(d for d in dims if d != -1)
  if -1 in dims:
    if num_devices % known:
      raise ShardingError(f"mesh {dims} does not divide {num_devices} devices")
    dims[dims.index(-1)] = num_devices // known
  if math.prod(dims) != num_devices:
    raise ShardingError(f"mesh {dims} uses {math.prod(dims)} devices, have {num_devices}; "
                        "set one axis to -1 to fill")
  return tuple(dims)


def make_mesh(parallelism: Sequence[int] = (-1, 1, 1), dcn_parallelism: Optional[Sequence[int]] = None,
              devices=None) -> Mesh:
  """Mesh over all (or the given) devices with axes data, fsdp, tensor.

  With several processes, `dcn_parallelism` gives the cross-host split per axis
  and `parallelism` the split within a host (ici), as in multi-slice runs.
  """
  devices = jax.devices() if devices is None else devices
  n = len(devices)
  if dcn_parallelism is not None and jax.process_count() > 1:
    from jax.experimental import mesh_utils
    dcn = mesh_shape(dcn_parallelism, jax.process_count())
    ici = mesh_shape(parallelism, n // jax.process_count())
    arr = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices)
    return Mesh(arr, MESH_AXES)
  shape = mesh_shape(parallelism, n)
  try:
    from jax.experimental import mesh_utils
    arr = mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # CPU devices or unusual topologies
    arr = np.asarray(devices).reshape(shape)
  return Mesh(arr, MESH_AXES)


def mesh_from_config(config) -> Mesh:
  """config.mesh: ConfigDict with `ici` (and optional `dcn`) parallelism lists."""
  m = config.get("mesh", None) if hasattr(config, "get") else None
  ici = tuple(m.get("ici", (-1, 1, 1))) if m is not None else (-1, 1, 1)
  dcn = m.get("dcn", None) if m is not None else None
  return make_mesh(ici, dcn)


def local_mesh_from_config(config) -> Mesh:
  """A mesh over this host's devices only, for work each host does alone.

  Generation stages deal whole chunks to hosts (see `multihost`), so a host
  must not need the others in its sampler calls: the global mesh would put
  every host into every call. The config's `mesh.ici` shape is the within-host
  split, so it is used over `jax.local_devices()`; when it does not fit the
  local device count, a 1-D data mesh over the local devices is used (logged).
  With one process this is the same device set as `mesh_from_config`.
  """
  m = config.get("mesh", None) if hasattr(config, "get") else None
  ici = tuple(m.get("ici", (-1, 1, 1))) if m is not None else (-1, 1, 1)
  devices = jax.local_devices()
  try:
    shape = mesh_shape(ici, len(devices))
  except ShardingError as e:
    logging.warning("local mesh: config.mesh.ici=%s does not fit the %d local devices (%s); "
                    "using a data mesh over them", list(ici), len(devices), e)
    shape = (len(devices), 1, 1)
  return make_mesh(shape, devices=devices)


def rules_from_config(config) -> tuple:
  rules = config.get("logical_axis_rules", None) if hasattr(config, "get") else None
  if not rules:
    return DEFAULT_RULES
  return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in rules)


def _mesh_axes_for(name, rules):
  for k, v in rules:
    if k == name:
      return v
  return None


def logical_to_mesh_spec(logical: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh,
                         rules=DEFAULT_RULES) -> P:
  """PartitionSpec for one array; dims that don't divide are replicated."""
  out, used = [], set()
  for name, size in zip(logical, shape):
    axes = None if name is None else _mesh_axes_for(name, rules)
    if axes is None:
      out.append(None)
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    axes = tuple(a for a in axes if a not in used and mesh.shape.get(a, 1) > 1)
    n = math.prod(mesh.shape[a] for a in axes) if axes else 1
    if not axes or size % n:
      # Try the largest dividing prefix of the axes before giving up.
      while axes and size % math.prod(mesh.shape[a] for a in axes):
        axes = axes[:-1]
      if not axes:
        out.append(None)
        continue
    used.update(axes)
    out.append(axes[0] if len(axes) == 1 else axes)
  return P(*out)


_ACTIVATIONS = threading.local()


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules=DEFAULT_RULES):
  """Inside this context (while tracing), `constrain` pins activations to `mesh`.
  Also a decorator: `@activation_sharding(mesh)` on the function to be jitted.

  Without such constraints GSPMD may meet an FSDP-sharded weight by moving the
  batch off its axis instead of all-gathering the weight: it then computes
  full-batch partial sums (a B x T x mlp buffer per device) and reduce-scatters
  them, which costs far more memory and traffic than gathering the weight.
  """
  prev = getattr(_ACTIVATIONS, "ctx", None)
  _ACTIVATIONS.ctx = (mesh, rules)
  try:
    yield
  finally:
    _ACTIVATIONS.ctx = prev


def constrain(x, logical: Sequence[Optional[str]]):
  """`x` with a sharding constraint from logical names; a no-op outside
  `activation_sharding` or on a one-device mesh."""
  ctx = getattr(_ACTIVATIONS, "ctx", None)
  if ctx is None:
    return x
  mesh, rules = ctx
  if mesh.size == 1:
    return x
  spec = logical_to_mesh_spec(logical, x.shape, mesh, rules)  # unnamed trailing dims: replicated
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _is_spec(x):
  return isinstance(x, P)


def tree_shardings(abstract_tree, logical_specs, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedSharding tree for a tree of arrays/ShapeDtypeStructs with logical specs."""
  def one(x, spec):
    logical = tuple(spec) if spec is not None else ()
    logical = logical + (None,) * (len(x.shape) - len(logical))
    return NamedSharding(mesh, logical_to_mesh_spec(logical, x.shape, mesh, rules))
  return jax.tree_util.tree_map(one, abstract_tree, logical_specs,
                                is_leaf=lambda x: x is None or _is_spec(x))


def param_shardings(cfg, mesh: Mesh, heads=("lm",), rules=DEFAULT_RULES):
  from cai_jax import models
  abstract, specs = models.abstract_params(cfg, heads)
  return tree_shardings(abstract, specs, mesh, rules)


def shardings_like(params, cfg, mesh: Mesh, rules=DEFAULT_RULES):
  """Shardings for an existing params tree (any heads present)."""
  from cai_jax import models
  heads = models.heads_of(cfg, params)
  heads = heads if heads else ("lm",)
  abstract, specs = models.abstract_params(cfg, heads)
  flat_specs = _flatten_dict(specs)
  def one(path, x):
    spec = flat_specs.get(path)
    logical = tuple(spec) if spec is not None else ()
    logical = logical + (None,) * (len(x.shape) - len(logical))
    return NamedSharding(mesh, logical_to_mesh_spec(logical, x.shape, mesh, rules))
  return _map_with_path(one, params)


def _flatten_dict(d, prefix=()):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten_dict(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _map_with_path(fn, d, prefix=()):
  if isinstance(d, dict):
    return {k: _map_with_path(fn, v, prefix + (k,)) for k, v in d.items()}
  return fn(prefix, d)


def shard_params(params, cfg, mesh: Mesh, rules=DEFAULT_RULES):
  """Places an existing (host or device) params tree onto the mesh."""
  return jax.device_put(params, shardings_like(params, cfg, mesh, rules))


def sharded_init(cfg, rng, mesh: Mesh, heads=("lm",), rules=DEFAULT_RULES):
  """eval_shape -> logical specs -> NamedSharding -> jit(init, out_shardings)."""
  from cai_jax import models
  shardings = param_shardings(cfg, mesh, heads, rules)
  init = jax.jit(lambda r: models.init_params(cfg, r, heads), out_shardings=shardings)
  return init(rng)


def batch_sharding(mesh: Mesh, ndim: int = 2, rules=DEFAULT_RULES) -> NamedSharding:
  """Batch-major arrays: leading dim over the `batch` rule's mesh axes."""
  axes = _mesh_axes_for("batch", rules)
  axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
  axes = tuple(a for a in axes if mesh.shape.get(a, 1) > 1)
  lead = None if not axes else (axes[0] if len(axes) == 1 else axes)
  return NamedSharding(mesh, P(lead, *([None] * (ndim - 1))))


def batch_divisor(mesh: Mesh, rules=DEFAULT_RULES) -> int:
  axes = _mesh_axes_for("batch", rules)
  axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
  return math.prod(mesh.shape.get(a, 1) for a in axes)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def shard_batch(batch, mesh: Mesh, rules=DEFAULT_RULES):
  """Places a host batch (dict of numpy arrays, same global batch on every
  process) onto the mesh, leading dim sharded over the batch axes."""
  def put(x):
    x = np.asarray(x)
    s = batch_sharding(mesh, max(x.ndim, 1), rules)
    if jax.process_count() == 1:
      return jax.device_put(x, s)
    return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])
  return jax.tree_util.tree_map(put, batch)


def make_global_batch(local_batch, mesh: Mesh, rules=DEFAULT_RULES):
  """Assembles per-process shards (each host's own rows) into global arrays."""
  def put(x):
    x = np.asarray(x)
    s = batch_sharding(mesh, max(x.ndim, 1), rules)
    return jax.make_array_from_process_local_data(s, x)
  return jax.tree_util.tree_map(put, local_batch)


def maybe_initialize_distributed(config=None) -> bool:
  """Calls jax.distributed.initialize() when asked by config or environment.

  Enabled by `config.distributed.enabled` or CAI_JAX_DISTRIBUTED=1. On TPU VMs
  no arguments are needed; elsewhere COORDINATOR_ADDRESS, NUM_PROCESSES and
  PROCESS_ID (or the config fields) name the coordinator and this process.
  Returns True when the distributed runtime is (now) initialised.
  """
  dist = None
  if config is not None and hasattr(config, "get"):
    dist = config.get("distributed", None)
  enabled = bool(dist and dist.get("enabled", False)) or os.environ.get("CAI_JAX_DISTRIBUTED") == "1"
  if not enabled:
    return False
  try:
    from jax._src import distributed as _d
    if _d.global_state.client is not None:
      return True
  except Exception:
    pass
  kw: dict[str, Any] = {}
  coord = (dist.get("coordinator_address", None) if dist else None) or os.environ.get("COORDINATOR_ADDRESS")
  nproc = (dist.get("num_processes", None) if dist else None) or os.environ.get("NUM_PROCESSES")
  pid = dist.get("process_id", None) if dist else None
  pid = pid if pid is not None else os.environ.get("PROCESS_ID")
  if coord:
    kw["coordinator_address"] = coord
  if nproc:
    kw["num_processes"] = int(nproc)
  if pid is not None:
    kw["process_id"] = int(pid)
  if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
    try:
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception:
      pass
  jax.distributed.initialize(**kw)
  logging.info("distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True



def opt_state_shardings(tx, params, mesh: Mesh):
  """NamedShardings for `tx.init(params)` on sharded params.

  Every copy of a parameter inside the optimizer state (Adam's mu and nu,
  accumulated gradients, also under masks) takes that parameter's sharding;
  everything else (step counts) is replicated. Without this, `jax.jit(tx.init)`
  leaves the moments replicated (zeros do not depend on the params' values, so
  nothing propagates their sharding): two full model copies per device.
  `params` may be arrays or ShapeDtypeStructs with shardings.
  """
  shapes = jax.eval_shape(tx.init, params)
  by_path = {}
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    by_path[tuple(getattr(k, "key", None) for k in path)] = x
  rep = replicated(mesh)

  def one(path, x):
    # The state path ends with the parameter's dict keys, e.g. .mu['layers_0']['attn']['q_kernel'].
    keys = []
    for k in reversed(path):
      if not isinstance(k, jax.tree_util.DictKey):
        break
      keys.insert(0, k.key)
    p = by_path.get(tuple(keys))
    if p is not None and tuple(p.shape) == tuple(x.shape) and isinstance(p.sharding, NamedSharding):
      return p.sharding
    return rep
  return jax.tree_util.tree_map_with_path(one, shapes)


def init_opt_state(tx, params, mesh: Optional[Mesh]):
  """`tx.init(params)` with the moments sharded like the params when the params
  live on `mesh` (see opt_state_shardings); a plain jitted init otherwise."""
  leaves = jax.tree_util.tree_leaves(params)
  on_mesh = mesh is not None and leaves and all(
      isinstance(getattr(x, "sharding", None), NamedSharding) and x.sharding.mesh == mesh
      for x in leaves)
  if on_mesh:
    return jax.jit(tx.init, out_shardings=opt_state_shardings(tx, params, mesh))(params)
  return jax.jit(tx.init)(params)
