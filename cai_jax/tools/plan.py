"""Memory planner: per-device memory of the train steps per mesh, and the split
each training stage would choose on a named TPU slice.

  python -m cai_jax.tools.plan --config=configs/paper.py --model=llama2-7b
  python -m cai_jax.tools.plan --model=llama3-8b --meshes='1,4,1;1,16,1;1,8,4' --remat
  python -m cai_jax.tools.plan --config=configs/paper.py:model=llama2-7b --slice=v5e-16

With --slice, each step (sft, pm, ppo by default) is fitted as the stage fits it
at start-up (`training.memory.choose`): the config's global batch kept, the
micro-batch x accumulation split, rematerialisation and logits chunk chosen so
that the compiled step fits the slice's HBM per chip (times memory.HEADROOM),
on an FSDP mesh over the slice's chips. It exits 2, with the reason, when no
split of some step fits.

Lowers and compiles the project's own jitted steps (`training.make_train_step`
with `objectives.sft_loss_fn`, and `rl.update.make_update_fn`) for abstract
inputs: ShapeDtypeStructs carrying NamedShardings, so no parameter is ever
allocated. Meshes are built over simulated CPU devices (the planner sets
`--xla_force_host_platform_device_count` itself when it starts JAX), and each
row reports `compiled.memory_analysis()`: the per-device bytes of arguments,
outputs not aliased to donated inputs, and temporaries. For PPO the frozen
reference policy and preference model, resident during rollouts but not
arguments of the update, are added from their shardings.

The model is compiled with `scan_layers` (one `nn.scan` over layer-stacked
params) unless --no-scan_layers: the state is the same, but the CPU compiler,
whose schedule has no memory limit, all-gathers every unrolled layer's FSDP
weights up front, while in the scan one layer's gathered weights are live at
a time, as a TPU compile schedules the unrolled layers. Compile time is then
independent of depth (about 10 s for a 7B step here).

The numbers come from the XLA CPU compiler, which also runs bf16 matmuls in
f32. A TPU compile schedules and fuses differently, so treat them as a guide
to which slice a run needs (leave headroom), not as a guarantee.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Optional, Sequence

GiB = float(1 << 30)

# Default meshes (data, fsdp, tensor): one per slice size the README walks through.
DEFAULT_MESHES = ((1, 4, 1), (1, 8, 1), (1, 16, 1), (1, 4, 4), (1, 32, 1), (2, 16, 1))
# HBM per chip (one JAX device), GiB.
HBM_GIB = {"v5e": 16, "v4": 32, "v5p": 95}
# TensorCores per chip in slice names: v4-32 and v5p-64 count two per chip (one JAX
# device per chip, megacore); v5e-16 counts chips.
CORES_PER_CHIP = {"v5e": 1, "v4": 2, "v5p": 2}


def parse_slice(name: str) -> tuple:
  """'v5e-16' -> ('v5e', 16 chips, 16 GiB per chip)."""
  kind, _, size = name.strip().lower().partition("-")
  if kind not in HBM_GIB or not size.isdigit() or int(size) % CORES_PER_CHIP[kind] \
      or int(size) < CORES_PER_CHIP[kind]:
    raise PlanError(f"--slice {name!r}: expected <type>-<size> with type one of "
                    f"{', '.join(HBM_GIB)} (e.g. v5e-16, v4-32, v5p-64)")
  return kind, int(size) // CORES_PER_CHIP[kind], HBM_GIB[kind]


class PlanError(ValueError):
  """Bad planner input (model, mesh); a one-line message."""


def parse_meshes(text: str) -> tuple:
  """'1,8,1;1,4,2' -> ((1, 8, 1), (1, 4, 2))."""
  out = []
  for part in text.split(";"):
    part = part.strip()
    if not part:
      continue
    try:
      dims = tuple(int(x) for x in part.split(","))
    except ValueError:
      raise PlanError(f"--meshes: {part!r} is not data,fsdp,tensor integers; e.g. '1,8,1;1,4,2'")
    if len(dims) != 3 or min(dims) < 1:
      raise PlanError(f"--meshes: {part!r} needs three positive sizes (data,fsdp,tensor)")
    out.append(dims)
  if not out:
    raise PlanError("--meshes: no mesh given; e.g. '1,8,1;1,4,2'")
  return tuple(out)


def ensure_devices(n: int) -> None:
  """Makes JAX start with at least `n` CPU devices (before it is first used)."""
  flags = os.environ.get("XLA_FLAGS", "")
  key = "--xla_force_host_platform_device_count="
  have = 0
  for f in flags.split():
    if f.startswith(key):
      have = int(f[len(key):])
  if "jax" in sys.modules:
    import jax
    try:
      started = jax._src.xla_bridge.backends_are_initialized()  # noqa: SLF001
    except Exception:
      started = True
    if started:
      if jax.device_count() < n:
        raise PlanError(f"JAX already started with {jax.device_count()} devices, the meshes "
                        f"need {n}; run the planner in a fresh process")
      return
  if have < n:
    flags = " ".join(f for f in flags.split() if not f.startswith(key))
    flags = (flags + f" {key}{n}").strip()
  sched = "--xla_cpu_enable_concurrency_optimized_scheduler"
  if sched not in flags:
    # The CPU default schedules for concurrency and holds more buffers live at
    # once; a memory-minimising order is closer to what a TPU compile does.
    flags += f" {sched}=false"
  os.environ["XLA_FLAGS"] = flags.strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")


def model_config(name: str, dtype: Optional[str] = None, remat: Optional[bool] = None,
                 scan_layers: Optional[bool] = None):
  """A ModelConfig from a preset name, "tiny", or an HF dir (config.json only)."""
  from cai_jax import models
  key = name.lower()
  if key in models.PRESETS and key != "tiny":
    cfg = models.PRESETS[key]()
  elif key == "tiny":
    from cai_jax.roles import tiny_config
    cfg = tiny_config()
  elif os.path.isfile(os.path.join(name, "config.json")):
    with open(os.path.join(name, "config.json")) as f:
      cfg = models.ModelConfig.from_hf_dict(json.load(f), source=os.path.join(name, "config.json"))
  else:
    raise PlanError(f"model {name!r}: not a preset ({', '.join(sorted(models.PRESETS))}) nor an "
                    "HF directory with config.json; pass --model")
  kw = {}
  if dtype:
    kw.update(dtype=dtype, param_dtype=dtype)
  if remat is not None:
    kw["remat"] = bool(remat)
  if scan_layers is not None:
    kw["scan_layers"] = bool(scan_layers)
  return cfg.replace(**kw) if kw else cfg


@dataclasses.dataclass
class Shapes:
  """The batch shapes the steps are compiled for (from the config's sections)."""
  sft_batch: int = 64
  sft_len: int = 1024
  logits_chunk: int = 256
  ppo_batch: int = 64
  ppo_prompt: int = 256
  ppo_response: int = 256
  ppo_minibatches: int = 4
  ppo_epochs: int = 1
  pm_batch: int = 64
  pm_len: int = 512
  lora_rank: int = 0       # > 0: SFT and PPO train rank-r adapters of every projection
  dpo_batch: int = 64
  dpo_len: int = 512


def shapes_from_config(config) -> Shapes:
  s = Shapes()
  if config is None:
    return s
  sft = config.get("sft", None)
  if sft is not None:
    s.sft_batch = int(sft.get("batch_size", s.sft_batch))
    s.sft_len = int(sft.get("max_len", s.sft_len))
    s.logits_chunk = int(sft.get("logits_chunk", s.logits_chunk))
  pm = config.get("pm", None)
  if pm is not None:
    s.pm_batch = int(pm.get("batch_size", s.pm_batch))
    s.pm_len = int(pm.get("max_len", s.pm_len))
  lora_rank = max((int(config[k].lora.rank) for k in ("sft", "ppo")
                   if k in config and "lora" in config[k]), default=0)
  s.lora_rank = lora_rank
  ppo = config.get("ppo", None)
  if ppo is not None:
    s.ppo_batch = int(ppo.get("batch_size", s.ppo_batch))
    s.ppo_prompt = int(ppo.get("max_prompt_tokens", s.ppo_prompt))
    s.ppo_response = int(ppo.get("max_new_tokens", s.ppo_response))
    s.ppo_minibatches = int(ppo.get("num_minibatches", s.ppo_minibatches))
  dpo = config.get("dpo", None)
  if dpo is not None:
    s.dpo_batch = int(dpo.get("batch_size", s.dpo_batch))
    s.dpo_len = int(dpo.get("max_len", s.dpo_len))
  return s


# ------------------------------------------------------------ abstract inputs
def _sds(shape, dtype, sharding):
  import jax
  return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def abstract_sharded_params(cfg, mesh, heads, rules):
  """ShapeDtypeStructs with the shardings `sharding.shard_params` would give."""
  import jax
  from cai_jax import models, sharding
  abstract, specs = models.abstract_params(cfg, heads)
  shard = sharding.tree_shardings(abstract, specs, mesh, rules)
  return jax.tree_util.tree_map(lambda a, s: _sds(a.shape, a.dtype, s), abstract, shard)


def with_lora(params_sds, mesh, rank: int):
  """Abstract params with rank-`rank` adapters on every projection (replicated:
  they are small), as `models.lora.add` makes them; unchanged for rank 0."""
  import jax
  from cai_jax import sharding
  from cai_jax.models import lora
  if not rank:
    return params_sds
  shapes = jax.eval_shape(lambda p: lora.add(p, rank, 16.0, tuple(lora.TARGETS),
                                             jax.random.PRNGKey(0))[lora.KEY], params_sds)
  rep = sharding.replicated(mesh)
  return dict(params_sds, **{lora.KEY: jax.tree_util.tree_map(
      lambda x: _sds(x.shape, x.dtype, rep), shapes)})


def abstract_opt_state(tx, params_sds, mesh):
  """Optimizer state as the train states place it (`sharding.opt_state_shardings`)."""
  import jax
  from cai_jax import sharding
  shapes = jax.eval_shape(tx.init, params_sds)
  shard = sharding.opt_state_shardings(tx, params_sds, mesh)
  return jax.tree_util.tree_map(lambda x, s: _sds(x.shape, x.dtype, s), shapes, shard)


def per_device_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
  from cai_jax.training.state import per_device_bytes as per_device
  return per_device(tree)


# ---------------------------------------------------------------- the steps
def _lm_train_state(cfg, mesh, optim_config, rules, heads=("lm",), lora_rank: int = 0):
  """(optimizer, abstract TrainState of a language model, replicated sharding)."""
  import jax.numpy as jnp
  from cai_jax import sharding
  from cai_jax.models import lora
  from cai_jax.training import optim
  from cai_jax.training.state import TrainState
  params = with_lora(abstract_sharded_params(cfg, mesh, heads, rules), mesh, lora_rank)
  tx = optim.make_optimizer(optim_config, trainable=lora.trainable_mask if lora_rank else None)
  rep = sharding.replicated(mesh)
  state = TrainState(step=_sds((), jnp.int32, rep), params=params,
                     opt_state=abstract_opt_state(tx, params, mesh))
  return tx, state, rep


def lower_sft(cfg, mesh, shapes: Shapes, optim_config, rules, micro_batches: int = 1):
  """The SFT stage's train step, lowered for abstract state and batch."""
  import jax.numpy as jnp
  from cai_jax import sharding
  from cai_jax.models import lora
  from cai_jax.training import loop, objectives
  tx, state, rep = _lm_train_state(cfg, mesh, optim_config, rules, lora_rank=shapes.lora_rank)
  B, L = shapes.sft_batch, shapes.sft_len
  bs = sharding.batch_sharding(mesh, 2, rules)
  batch = {"tokens_BxL": _sds((B, L), jnp.int32, bs), "targets_BxL": _sds((B, L), jnp.int32, bs),
           "loss_mask_BxL": _sds((B, L), jnp.float32, bs), "mask_BxL": _sds((B, L), bool, bs)}
  trainable = lora.trainable_mask(state.params) if shapes.lora_rank else None
  step = loop.make_train_step(objectives.sft_loss_fn(cfg, shapes.logits_chunk), tx, state,
                              mesh, batch, trainable, rules=rules, micro_batches=micro_batches)
  rng = _sds((2,), jnp.uint32, rep)
  return step.lower(state, batch, rng), per_device_bytes(state), 0


def lower_pm(cfg, mesh, shapes: Shapes, optim_config, rules, micro_batches: int = 1):
  """The pm stage's train step: both sequences of each pair in one forward pass."""
  import jax.numpy as jnp
  from cai_jax import sharding
  from cai_jax.training import loop, objectives
  tx, state, rep = _lm_train_state(cfg, mesh, optim_config, rules, heads=("score",))
  B, L = shapes.pm_batch, shapes.pm_len
  bs, b1 = sharding.batch_sharding(mesh, 2, rules), sharding.batch_sharding(mesh, 1, rules)
  batch = {"p_B": _sds((B,), jnp.float32, b1)}
  for side in ("a", "b"):
    batch.update({f"tokens_{side}_BxL": _sds((B, L), jnp.int32, bs),
                  f"mask_{side}_BxL": _sds((B, L), bool, bs)})
  step = loop.make_train_step(objectives.pm_loss_fn(cfg), tx, state, mesh, batch, rules=rules,
                              micro_batches=micro_batches)
  rng = _sds((2,), jnp.uint32, rep)
  return step.lower(state, batch, rng), per_device_bytes(state), 0


def lower_dpo(cfg, mesh, shapes: Shapes, optim_config, rules):
  """The dpo stage's train step: both responses of each pair in one forward pass; the
  reference's log-probs arrive with the batch, so no second model is resident."""
  import jax.numpy as jnp
  from cai_jax import sharding
  from cai_jax.training import loop, objectives
  tx, state, rep = _lm_train_state(cfg, mesh, optim_config, rules)
  B, L = shapes.dpo_batch, shapes.dpo_len
  bs, b1 = sharding.batch_sharding(mesh, 2, rules), sharding.batch_sharding(mesh, 1, rules)
  batch = {"p_B": _sds((B,), jnp.float32, b1), "ref_a_B": _sds((B,), jnp.float32, b1),
           "ref_b_B": _sds((B,), jnp.float32, b1)}
  for side in ("a", "b"):
    batch.update({f"tokens_{side}_BxL": _sds((B, L), jnp.int32, bs),
                  f"targets_{side}_BxL": _sds((B, L), jnp.int32, bs),
                  f"loss_mask_{side}_BxL": _sds((B, L), jnp.float32, bs),
                  f"mask_{side}_BxL": _sds((B, L), bool, bs)})
  step = loop.make_train_step(objectives.dpo_loss_fn(cfg, 0.1, "soft"), tx, state, mesh, batch,
                              rules=rules)
  rng = _sds((2,), jnp.uint32, rep)
  return step.lower(state, batch, rng), per_device_bytes(state), 0


def lower_ppo(cfg, mesh, shapes: Shapes, policy_optim, value_optim, rules, critic: bool = True,
              micro_batches: int = 1):
  """The PPO update (K epochs of minibatch steps) for policy + value model, or
  (critic=False) the GRPO / RLOO update of the policy alone, whose k3 loss term
  reads the reference log-probs."""
  import jax.numpy as jnp
  from cai_jax import sharding
  from cai_jax.models import lora
  from cai_jax.rl import update
  from cai_jax.training import optim
  mask = lora.trainable_mask if shapes.lora_rank else None
  policy = with_lora(abstract_sharded_params(cfg, mesh, ("lm",), rules), mesh, shapes.lora_rank)
  ptx = optim.make_optimizer(policy_optim, trainable=mask)
  rep = sharding.replicated(mesh)
  state = {"step": _sds((), jnp.int32, rep), "policy": policy,
           "policy_opt": abstract_opt_state(ptx, policy, mesh)}
  vtx = None
  if critic:
    value = with_lora(abstract_sharded_params(cfg, mesh, ("score",), rules), mesh,
                      shapes.lora_rank)
    vtx = optim.make_optimizer(value_optim, trainable=mask)
    state.update(value=value, value_opt=abstract_opt_state(vtx, value, mesh))
  shardings = update.state_shardings(state, mesh)
  hp = update.UpdateHParams(epochs=shapes.ppo_epochs, num_minibatches=shapes.ppo_minibatches,
                            critic=critic, kl_in_loss=not critic, micro_batches=micro_batches)
  B = shapes.ppo_batch
  bs = update.batch_input_sharding(mesh, B, rules)
  batch = {k: _sds(x.shape, x.dtype, bs) for k, x in
           update.example_batch(hp, B, shapes.ppo_prompt, shapes.ppo_response).items()}
  fn = update.make_update_fn(cfg, cfg, ptx, vtx, hp, mesh, shardings, B, rules, trainable=mask)
  # Frozen during the update but resident for rollouts: the PM, and the reference
  # policy unless LoRA makes it the state's own frozen base.
  frozen = per_device_bytes(abstract_sharded_params(cfg, mesh, ("score",), rules))
  if not shapes.lora_rank:
    frozen += per_device_bytes(abstract_sharded_params(cfg, mesh, ("lm",), rules))
  return (fn.lower(state, batch, _sds((2,), jnp.uint32, rep), _sds((), jnp.float32, rep)),
          per_device_bytes(state), frozen)


@dataclasses.dataclass
class Row:
  step: str
  mesh: tuple
  devices: int
  state_gib: float       # train state (params + optimizer) per device
  argument_gib: float    # all arguments (state + batch)
  output_gib: float      # outputs not aliased to donated arguments
  temp_gib: float        # temporaries (activations, gradients, logits chunks)
  frozen_gib: float      # PPO: reference + PM params resident beside the update
  total_gib: float       # argument + output + temp + frozen
  compile_s: float

  def fits(self) -> str:
    ok = [k for k, v in sorted(HBM_GIB.items(), key=lambda kv: kv[1]) if self.total_gib <= v]
    return ",".join(ok) if ok else "none"


def analyse(lowered, state_bytes, frozen_bytes, step, mesh_dims) -> Row:
  t0 = time.perf_counter()
  compiled = lowered.compile()
  dt = time.perf_counter() - t0
  m = compiled.memory_analysis()
  if m is None:
    raise PlanError("this backend reports no memory analysis")
  arg = m.argument_size_in_bytes
  out = max(m.output_size_in_bytes - m.alias_size_in_bytes, 0)
  tmp = m.temp_size_in_bytes
  total = arg + out + tmp + frozen_bytes
  return Row(step, tuple(mesh_dims), math.prod(mesh_dims), state_bytes / GiB, arg / GiB,
             out / GiB, tmp / GiB, frozen_bytes / GiB, total / GiB, dt)


def _rules(config, rules):
  from cai_jax import sharding
  if rules is not None:
    return rules
  return sharding.rules_from_config(config) if config is not None else sharding.DEFAULT_RULES


def _section_optim(config, section, name):
  from cai_jax.training import optim
  sec = config.get(section, None) if config is not None else None
  return sec[name] if sec is not None and name in sec else optim.default_optim_config()


def step_batch(step: str, shapes: Shapes) -> tuple:
  """(rows the step's batch splits into micro-batches, config field that sets them)."""
  if step == "sft":
    return shapes.sft_batch, "sft.batch_size"
  if step == "pm":
    return shapes.pm_batch, "pm.batch_size"
  if step == "dpo":
    return shapes.dpo_batch, "dpo.batch_size"
  if step in ("ppo", "grpo", "rloo"):
    if shapes.ppo_batch % shapes.ppo_minibatches:
      raise PlanError(f"ppo batch {shapes.ppo_batch} not divisible by "
                      f"{shapes.ppo_minibatches} minibatches")
    return shapes.ppo_batch // shapes.ppo_minibatches, "ppo minibatch"
  raise PlanError(f"unknown step {step!r}; use sft, pm, ppo, grpo, rloo or dpo")


def lower_step(step: str, cfg, mesh, shapes: Shapes, config, rules, micro_batches: int = 1):
  """(lowered step, state bytes, frozen bytes) of one step on `mesh`."""
  if step == "sft":
    return lower_sft(cfg, mesh, shapes, _section_optim(config, "sft", "optim"), rules,
                     micro_batches)
  if step == "pm":
    return lower_pm(cfg, mesh, shapes, _section_optim(config, "pm", "optim"), rules,
                    micro_batches)
  if step == "dpo":
    return lower_dpo(cfg, mesh, shapes, _section_optim(config, "dpo", "optim"), rules)
  return lower_ppo(cfg, mesh, shapes, _section_optim(config, "ppo", "policy_optim"),
                   _section_optim(config, "ppo", "value_optim"), rules, critic=step == "ppo",
                   micro_batches=micro_batches)


def _mesh(dims, rules, shapes: Shapes, steps):
  import jax
  from cai_jax import sharding
  n = math.prod(dims)
  if n > jax.device_count():
    raise PlanError(f"mesh {dims} needs {n} devices, JAX has {jax.device_count()}")
  mesh = sharding.make_mesh(dims, devices=jax.devices()[:n])
  div = sharding.batch_divisor(mesh, rules)
  for step in steps:
    rows, field = step_batch(step, shapes)
    if step in ("sft", "pm", "dpo") and rows % div:
      raise PlanError(f"{step} batch {rows} does not divide over mesh {dims} "
                      f"(batch axes = {div}); change {field} or the mesh")
  return mesh, div


def plan(cfg, meshes: Sequence[tuple], shapes: Shapes, steps=("sft", "ppo"), config=None,
         rules=None, progress=print) -> list[Row]:
  """Compiles each step on each mesh; returns one Row per (step, mesh)."""
  rules = _rules(config, rules)
  rows = []
  for dims in meshes:
    mesh, _ = _mesh(dims, rules, shapes, steps)
    for step in steps:
      row = analyse(*lower_step(step, cfg, mesh, shapes, config, rules), step, dims)
      rows.append(row)
      if progress:
        progress(f"  {step} mesh={dims}: {row.total_gib:.2f} GiB/device = state "
                 f"{row.state_gib:.2f} + temp {row.temp_gib:.2f} + frozen {row.frozen_gib:.2f} "
                 f"+ other {row.total_gib - row.state_gib - row.temp_gib - row.frozen_gib:.2f} "
                 f"(compiled in {row.compile_s:.0f}s)")
  return rows


def fit_slice(cfg, slice_name: str, shapes: Shapes, steps=("sft", "pm", "ppo"), config=None,
              rules=None, progress=print) -> list:
  """[(step, memory.Fit)]: each step's split on the named slice (FSDP over its chips).
  PlanError when some step fits no split."""
  import dataclasses as dc
  from cai_jax.training import memory
  _, chips, hbm = parse_slice(slice_name)
  rules = _rules(config, rules)
  dims = (1, chips, 1)
  mesh, div = _mesh(dims, rules, shapes, steps)
  budget = memory.device_budget(hbm)
  out = []
  for step in steps:
    rows, _ = step_batch(step, shapes)
    chunked = step == "sft"

    def measure(split, step=step):
      c = cfg.replace(remat=split.remat)
      sh = dc.replace(shapes, logits_chunk=split.logits_chunk)
      lowered, _, frozen = lower_step(step, c, mesh, sh, config, rules, split.micro_batches)
      return memory.compiled_bytes(lowered.compile(), frozen)

    try:
      fit = memory.choose(measure, rows, div if rows % div == 0 else 1, budget,
                          memory.Split(remat=bool(cfg.remat),
                                       logits_chunk=shapes.logits_chunk if chunked else 0),
                          chunked=chunked, name=step)
    except memory.FitError as e:
      raise PlanError(f"{slice_name}: {e}") from None
    out.append((step, fit))
    if progress:
      progress(f"  {fit.line(step)}")
  return out


def format_fits(fits, slice_name: str) -> str:
  _, chips, hbm = parse_slice(slice_name)
  lines = [f"{slice_name}: {chips} chips x {hbm} GiB, FSDP mesh (1,{chips},1)",
           "| step | rows per step | micro-batch | accumulation steps | remat | logits chunk "
           "| GiB/device | usable GiB |", "|" + "---|" * 8]
  for step, f in fits:
    k = f.split.micro_batches
    lines.append(f"| {step} | {f.batch_size} | {f.batch_size // k} | {k} | "
                 f"{'on' if f.split.remat else 'off'} | {f.split.logits_chunk or '-'} | "
                 f"{f.bytes / GiB:.2f} | {f.budget / GiB:.2f} |")
  return "\n".join(lines)


def format_table(rows: Sequence[Row], title: str = "") -> str:
  head = ("| step | mesh (data,fsdp,tensor) | devices | state | args | out | temp | frozen "
          "| total GiB/device | fits (HBM/chip: v5e 16, v4 32, v5p 95 GiB) |")
  lines = [title] if title else []
  lines += [head, "|" + "---|" * 10]
  for r in rows:
    lines.append(f"| {r.step} | {','.join(map(str, r.mesh))} | {r.devices} | "
                 f"{r.state_gib:.2f} | {r.argument_gib:.2f} | {r.output_gib:.2f} | "
                 f"{r.temp_gib:.2f} | {r.frozen_gib:.2f} | {r.total_gib:.2f} | {r.fits()} |")
  return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
  import argparse
  p = argparse.ArgumentParser(prog="python -m cai_jax.tools.plan",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--config", default="", help="config file[:arg] (ml_collections get_config); "
                 "batch shapes, dtype, optimizers and model come from it")
  p.add_argument("--model", default="", help="preset (llama2-7b, llama3-8b, gemma-7b, ...) or "
                 "HF dir; overrides config.model")
  p.add_argument("--meshes", default=";".join(",".join(map(str, m)) for m in DEFAULT_MESHES),
                 help="';'-separated data,fsdp,tensor meshes")
  p.add_argument("--steps", default="", help="comma-separated: sft, pm, ppo, grpo, rloo, "
                 "dpo (grpo and rloo compile the same critic-free update); default sft,ppo, "
                 "and sft,pm,ppo with --slice")
  p.add_argument("--slice", default="", help="a TPU slice (v5e-16, v4-32, v5p-64, ...): "
                 "print the split each step chooses to fit its HBM, instead of the mesh table")
  p.add_argument("--dtype", default="", help="param/compute dtype (default: config.dtype, "
                 "else bfloat16)")
  p.add_argument("--remat", action=argparse.BooleanOptionalAction, default=None,
                 help="rematerialise blocks (default: the model config's)")
  p.add_argument("--scan_layers", action=argparse.BooleanOptionalAction, default=True,
                 help="compile the layers as one scan (default): depth-independent compile "
                 "time, and one layer's gathered weights live at a time as on a TPU; "
                 "--no-scan_layers compiles the unrolled training layout, whose CPU schedule "
                 "gathers every layer's weights up front (a loose upper bound)")
  for f in dataclasses.fields(Shapes):
    p.add_argument(f"--{f.name}", type=int, default=None, help=f"override {f.name}")
  p.add_argument("--json", default="", help="also write the rows as JSON here")
  a = p.parse_args(argv)
  try:
    if a.slice:
      meshes = ((1, parse_slice(a.slice)[1], 1),)
    else:
      meshes = parse_meshes(a.meshes)
    ensure_devices(max(math.prod(m) for m in meshes))
    config = load_config(a.config) if a.config else None
    name = a.model or (config.get("model", "") if config is not None else "")
    if not name:
      raise PlanError("no model: pass --model PRESET (e.g. llama2-7b) or a --config with model")
    dtype = a.dtype or (config.get("dtype", "") if config is not None else "") or "bfloat16"
    cfg = model_config(name, dtype, a.remat, a.scan_layers)
    shapes = shapes_from_config(config)
    for f in dataclasses.fields(Shapes):
      v = getattr(a, f.name)
      if v is not None:
        setattr(shapes, f.name, v)
    steps = tuple(s.strip() for s in (a.steps or ("sft,pm,ppo" if a.slice else "sft,ppo"))
                  .split(",") if s.strip())
    print(f"planning {name}: {cfg.num_params() / 1e9:.2f}B params, {cfg.dtype}, "
          f"remat={cfg.remat}, scan_layers={cfg.scan_layers}; {shapes}", flush=True)
    if a.slice:
      fits = fit_slice(cfg, a.slice, shapes, steps, config,
                       progress=lambda m: print(m, flush=True))
    else:
      rows = plan(cfg, meshes, shapes, steps, config)
  except PlanError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if a.slice:
    print(format_fits(fits, a.slice))
    if a.json:
      from cai_jax.utils import atomic_write_text
      atomic_write_text(a.json, json.dumps({step: f.record() for step, f in fits}, indent=1)
                        + "\n")
    return 0
  print(format_table(rows))
  if a.json:
    from cai_jax.utils import atomic_write_text
    atomic_write_text(a.json, json.dumps([dataclasses.asdict(r) for r in rows], indent=1) + "\n")
  return 0


def load_config(spec: str):
  """A config file path with an optional ':arg', as `main.py --config` takes."""
  from cai_jax.tools import config_file
  from cai_jax.utils import InputError
  try:
    return config_file.load(spec)
  except InputError as e:
    raise PlanError(f"--config {e}") from None


if __name__ == "__main__":
  sys.exit(main())
