"""RL iteration = rollout + update + KL control, on one mesh.

`PPOTrainer` owns the frozen reference, the reward function, the optimizers
and the host-side controllers (β, reward normaliser); the train state (policy,
value, their optimizer states, step) is a pytree the caller threads through
`iteration` and checkpoints. `controller_state()` / `load_controller_state()`
give the JSON-able rest of what a resume needs.

`config.algorithm` picks the advantage estimator: "ppo" (value model + GAE,
the paper's RL-CAI) or the critic-free "grpo" / "rloo", which sample
`group_size` responses per prompt (consecutive rows), use the group as the
baseline and create no value model at all.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections

from cai_jax import models, sharding
from cai_jax.models import lora
from cai_jax.rl import control, rollout as rollout_lib, update as update_lib
from cai_jax.training import memory, optim
from cai_jax.training import state as state_lib


_UPDATE_CACHE: dict = {}


def _copy_tree(tree):
  # Fresh buffers: the train state is donated to the update, so nothing kept
  # outside it (reference, preference model) may share its arrays.
  return jax.jit(lambda t: jax.tree_util.tree_map(jnp.copy, t))(tree)


ALGORITHMS = ("ppo", "grpo", "rloo")


def has_critic(c: ml_collections.ConfigDict) -> bool:
  return str(c.get("algorithm", "ppo")) == "ppo"


def hparams_from_config(c: ml_collections.ConfigDict, eos_ids, stop_seqs=()):
  algorithm = str(c.get("algorithm", "ppo"))
  if algorithm not in ALGORITHMS:
    raise ValueError(f"ppo.algorithm={algorithm!r}: choose one of {', '.join(ALGORITHMS)}")
  critic = algorithm == "ppo"
  kl_in_loss = not critic and str(c.get("kl_in", "reward")) == "loss"
  rhp = rollout_lib.RolloutHParams(
      max_new_tokens=int(c.max_new_tokens), temperature=float(c.temperature),
      eos_ids=tuple(int(x) for x in eos_ids), stop_seqs=stop_seqs,
      gamma=float(c.gamma), lam=float(c.lam),
      missing_eos_penalty=float(c.missing_eos_penalty),
      whiten_advantages=bool(c.whiten_advantages), algorithm=algorithm,
      group_size=1 if critic else int(c.group_size), group_std=bool(c.get("group_std", True)),
      kl_in_loss=kl_in_loss)
  uhp = update_lib.UpdateHParams(
      epochs=int(c.num_epochs), num_minibatches=int(c.num_minibatches), clip_eps=float(c.clip_eps),
      value_clip_eps=float(c.value_clip_eps), vf_coef=float(c.vf_coef),
      ent_coef=float(c.ent_coef), critic=critic, kl_in_loss=kl_in_loss)
  return rhp, uhp


class PPOTrainer:
  """Builds the jitted pieces once; `iteration` runs one PPO iteration."""

  def __init__(self, config: ml_collections.ConfigDict, *, policy_cfg, policy_params,
               value_cfg, value_params, reward_fn: Callable, mesh, eos_ids=(2,),
               stop_seqs=(), ref_cfg=None, ref_params=None, sample_fn=None,
               rules=sharding.DEFAULT_RULES, hbm_gib: float = 0.0, ref_dtype: str = "",
               scan_layers: bool = False):
    """hbm_gib: device memory the update is fitted to (`training.memory`) when
    config.micro_batches is 0; 0 reads the runtime's (none on CPU: one micro-batch).
    ref_dtype: the reference policy's dtype ("" = the policy's); a cast copy of the
    initial policy, sharded like it, replaces the initial arrays.
    scan_layers: the train state holds the scanned layout (`training.fit.train_layout`),
    whose update gathers one layer's weights at a time; the sampler decodes an unrolled
    view made once per rollout, and `unrolled` gives the exported layout."""
    self.config = config
    self.scan_layers = bool(scan_layers)
    self.sample_cfg = policy_cfg
    self._value_cfg_unrolled = value_cfg
    if self.scan_layers:  # params arrive unrolled (host or device) and are stacked here
      policy_params = models.stack_layers(policy_cfg, policy_params)
      policy_cfg = policy_cfg.replace(scan_layers=True)
      if value_params is not None:
        value_params = models.stack_layers(value_cfg, value_params)
        value_cfg = value_cfg.replace(scan_layers=True)
    self.hbm_gib = float(hbm_gib)
    self.fit = None
    self.mesh = mesh
    self.rules = rules
    self.batch_size = int(config.batch_size)
    if not has_critic(config) and self.batch_size % int(config.group_size):
      raise ValueError(f"ppo: batch_size={self.batch_size} is not a multiple of "
                       f"group_size={config.group_size}")
    policy_params = sharding.shard_params(policy_params, policy_cfg, mesh, rules)
    self.rollout_hp, self.update_hp = hparams_from_config(config, eos_ids, stop_seqs)
    if not self.update_hp.critic:
      if value_params is not None:
        raise ValueError(f"{config.algorithm} is critic-free: pass no value model")
      value_cfg = None
    else:
      value_params = sharding.shard_params(value_params, value_cfg, mesh, rules)
    # LoRA: the reference is the policy's own frozen base, read from the train state
    # at each rollout (no second copy); with ref_dtype the bases are held in it.
    self.ref_is_base = ref_params is None and lora.KEY in policy_params
    if self.ref_is_base:
      if ref_dtype:
        policy_params = lora.cast_base(policy_params, ref_dtype)
        if value_params is not None:
          value_params = lora.cast_base(value_params, ref_dtype)
      ref_cfg = policy_cfg
    elif ref_params is None:
      # The reference keeps the initial sharded arrays; the train state gets copies
      # (it is donated), so no extra copy lives beyond init_state.
      ref_cfg, ref_params = models.frozen_copy(policy_cfg, policy_params, ref_dtype)
    else:
      ref_params = sharding.shard_params(ref_params, ref_cfg, mesh, rules)
    top = int(config.get("train_top_layers", -1))
    mask = None if top < 0 else (lambda p: optim.trainable_mask(p, top, train_embeddings=False))
    if lora.KEY in policy_params:  # LoRA: adapters (and the value head) train
      mask = lora.trainable_mask
    self.trainable = mask
    # What the sampler decodes: adapters merged once per rollout, not at every step,
    # and unrolled layers (decoding with a KV cache runs layer by layer).
    scfg = self.sample_cfg
    unroll = (lambda p: models.unstack_layers(scfg, p)) if self.scan_layers else (lambda p: p)
    self._sample_view = jax.jit(lambda p: unroll(lora.merge(p))) \
        if self.scan_layers or lora.KEY in policy_params else None
    self.policy_tx = optim.make_optimizer(config.policy_optim, trainable=mask)
    self.value_tx = optim.make_optimizer(config.value_optim, trainable=mask) \
        if self.update_hp.critic else None
    self.kl_ctl = control.make_kl_controller(config.kl.kind, config.kl.beta,
                                             config.kl.target, config.kl.horizon)
    self.normalizer = control.RunningMeanStd() if config.normalize_rewards else None
    self.rollout = rollout_lib.Rollout(policy_cfg, ref_cfg, ref_params, value_cfg, reward_fn,
                                       self.rollout_hp, mesh=mesh, sample_fn=sample_fn,
                                       normalizer=self.normalizer, sample_cfg=self.sample_cfg)
    self._init = (policy_params, value_params)
    self.policy_cfg, self.value_cfg = policy_cfg, value_cfg
    self._update = None

  def init_state(self, keep_initial: bool = False) -> dict:
    """Fresh train state from the initial parameters. Only the first call
    works unless `keep_initial` (which holds an extra copy of both models)."""
    if self._init is None:
      raise RuntimeError("PPOTrainer.init_state: initial parameters were released; "
                         "pass keep_initial=True to the earlier call")
    policy, value = self._init
    if not keep_initial:
      self._init = None
    value = None if value is None else _copy_tree(value)
    state = update_lib.init_state(_copy_tree(policy), value, self.policy_tx, self.value_tx,
                                  self.mesh)
    return state

  def _update_fn(self, state):
    if self._update is None:
      shardings = update_lib.state_shardings(state, self.mesh)
      # Trainers built from the same configuration (a resumed run in the same
      # process, tests) share one compiled update.
      self._fit_update(state, shardings)
      key = (self.policy_cfg, self.value_cfg, self.update_hp, self.mesh, self.batch_size,
             tuple(self.rules), self.config.policy_optim.to_json(),
             self.config.value_optim.to_json() if self.update_hp.critic else None,
             int(self.config.get("train_top_layers", -1)),
             jax.tree_util.tree_structure(shardings),
             tuple(jax.tree_util.tree_leaves(shardings)))
      if key not in _UPDATE_CACHE:
        _UPDATE_CACHE[key] = self._make_update(shardings, self.update_hp, self.policy_cfg,
                                               self.value_cfg)
      self._update = _UPDATE_CACHE[key]
    return self._update

  def _make_update(self, shardings, hp, policy_cfg, value_cfg):
    return update_lib.make_update_fn(policy_cfg, value_cfg, self.policy_tx, self.value_tx, hp,
                                     self.mesh, shardings, self.batch_size, self.rules,
                                     trainable=self.trainable)

  def _fit_update(self, state, shardings) -> None:
    """Chooses micro-batches and remat for the update (`training.memory`), counting
    the frozen models beside it, and sets update_hp and the model configs."""
    hp = self.update_hp
    rows = self.batch_size // hp.num_minibatches
    div = sharding.batch_divisor(self.mesh, self.rules)
    div = div if rows % div == 0 else 1
    # Resident beside the update: the reference (unless it is the LoRA base) and the
    # reward's model (a PM, or the feedback model of an AI reward).
    reward_model = rollout_lib.reward_model_params(self.rollout.reward_fn)
    resident = state_lib.per_device_bytes(reward_model) + (
        0 if self.ref_is_base else state_lib.per_device_bytes(self.rollout.ref_params))
    critic = self.value_cfg is not None
    batch = {k: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=update_lib.batch_input_sharding(self.mesh, self.batch_size,
                                                                    self.rules))
             for k, x in update_lib.example_batch(hp, self.batch_size,
                                                  int(self.config.max_prompt_tokens),
                                                  int(self.config.max_new_tokens)).items()}
    rng = jax.random.PRNGKey(0)

    def configs(split):
      return (self.policy_cfg.replace(remat=split.remat),
              self.value_cfg.replace(remat=split.remat) if critic else None)

    def measure(split):
      pc, vc = configs(split)
      fn = self._make_update(shardings, hp._replace(micro_batches=split.micro_batches), pc, vc)
      return memory.compiled_bytes(fn.lower(state, batch, rng, jnp.float32(0)).compile(),
                                   resident)

    self.fit = memory.choose(measure, rows, div, memory.device_budget(self.hbm_gib),
                             memory.Split(remat=bool(self.policy_cfg.remat)),
                             fixed_micro_batches=int(self.config.get("micro_batches", 0)),
                             name="ppo update")
    logging.info(self.fit.line("ppo update"))
    self.update_hp = hp._replace(micro_batches=self.fit.split.micro_batches)
    self.policy_cfg, self.value_cfg = configs(self.fit.split)

  def unrolled(self, params, value: bool = False):
    """The policy's (or value model's) params of the train state in the unrolled
    layout that exports, evaluation and the sampler read."""
    if not self.scan_layers:
      return params
    return models.unstack_layers(self._value_cfg_unrolled if value else self.sample_cfg, params)

  def controller_state(self) -> dict:
    reward = self.rollout.reward_fn
    return {"kl": self.kl_ctl.state_dict(),
            "normalizer": None if self.normalizer is None else self.normalizer.state_dict(),
            "reward": reward.state_dict() if hasattr(reward, "state_dict") else None}

  def load_controller_state(self, d: dict) -> None:
    self.kl_ctl.load_state_dict(d["kl"])
    if self.normalizer is not None and d.get("normalizer") is not None:
      self.normalizer.load_state_dict(d["normalizer"])
    if d.get("reward") is not None:  # a reward's running statistics (per-axis PM)
      self.rollout.reward_fn.load_state_dict(d["reward"])

  def iteration(self, state, prompt_tokens_BxP, prompt_mask_BxP, rng, prompts=None):
    """One rollout and one K-epoch update. Returns (state, metrics, transition).

    prompts: the prompts' message lists (needed by rewards read from text)."""
    if prompt_tokens_BxP.shape[0] != self.batch_size:
      raise ValueError(f"ppo: got {prompt_tokens_BxP.shape[0]} prompts, "
                       f"batch_size is {self.batch_size}")
    t_start = time.perf_counter()
    rng_sample, rng_update = jax.random.split(rng)
    beta = self.kl_ctl.beta
    # The log-probs the update's ratio starts from come from the policy as the update
    # trains it (layout, unmerged adapters); the sampler decodes its view of it.
    policy = state["policy"]
    tr, metrics, timings = self.rollout(
        policy, state.get("value"), prompt_tokens_BxP, prompt_mask_BxP, rng_sample, beta,
        prompts=prompts, ref_params=lora.base(policy) if self.ref_is_base else None,
        sample_params=None if self._sample_view is None else self._sample_view(policy))
    t0 = time.perf_counter()
    sh = update_lib.batch_input_sharding(self.mesh, self.batch_size, self.rules)
    host = jax.device_get(update_lib.batch_from_transition(tr, self.update_hp))
    # Every process holds the whole batch; each places the rows its devices own.
    batch = jax.tree_util.tree_map(
        lambda x: jax.make_array_from_callback(x.shape, sh, lambda idx, x=x: x[idx]), host)
    update = self._update_fn(state)
    state, upd_metrics = update(state, batch, rng_update, jnp.float32(beta))
    upd_metrics = {k: float(v) for k, v in jax.device_get(upd_metrics).items()}
    t_train = time.perf_counter() - t0
    self.kl_ctl.update(metrics["kl"], self.batch_size)
    wall = time.perf_counter() - t_start
    metrics.update(upd_metrics)
    metrics.update({
        "beta": beta,
        "time/generate": timings["generate"], "time/reward": timings["reward"],
        "time/forward": timings["forward"], "time/train": t_train, "time/iteration": wall,
        "tokens_per_sec": timings["generated_tokens"] / max(timings["generate"], 1e-9),
        "tokens_per_sec_total": timings["generated_tokens"] / max(wall, 1e-9),
    })
    return state, metrics, tr
