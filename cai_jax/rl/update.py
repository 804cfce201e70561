"""The PPO update: K epochs over shuffled minibatches in one jitted call.

`make_update_fn` returns a pure `(state, batch, rng) -> (state, metrics)`
compiled with explicit NamedSharding in/out shardings and the state donated.
The state is a dict {"step", "policy", "value", "policy_opt", "value_opt"};
policy and value are separate parameter trees (the value model may be a
different model: by default it starts from the preference model) each with
its own optimizer.

The batch is the full sequence (left-padded prompt of length P followed by a
right-padded response of length N) and per-response-token arrays; logits and
values for response token t are read at position P−1+t.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from cai_jax import models, sharding
from cai_jax.rl import losses


class UpdateHParams(NamedTuple):
  epochs: int = 4               # passes over the rollout batch
  num_minibatches: int = 4      # minibatches per pass
  clip_eps: float = 0.2         # policy ratio clip
  value_clip_eps: float = 0.2   # value clip around the rollout values
  vf_coef: float = 0.5          # weight of the value loss
  ent_coef: float = 0.0         # weight of the entropy bonus


def response_outputs(cfg, params, tokens_BxL, mask_BxL, num_response: int, head: str):
  """Logits (head="lm") or values (head="score") at the positions that predict
  / precede each of the last `num_response` tokens: BxNxV or BxN."""
  L = tokens_BxL.shape[1]
  P = L - num_response
  pos = models.positions_from_mask(mask_BxL)
  out = models.forward(cfg, params, tokens_BxL, pos, mask_BxL, heads=(head,))
  key = "logits" if head == "lm" else "scores"
  return out[key][:, P - 1:L - 1]


def batch_from_transition(tr: losses.Transition) -> dict:
  """The arrays the update reads, as a dict of batch-major arrays."""
  return {
      "tokens": jnp.concatenate([tr.prompt_tokens_BxP, tr.response_tokens_BxN], axis=1),
      "mask": jnp.concatenate([tr.prompt_mask_BxP, tr.response_mask_BxN], axis=1),
      "response_mask": tr.response_mask_BxN,
      "old_logprobs": tr.logprobs_BxN,
      "old_values": tr.values_BxN,
      "advantages": tr.advantages_BxN,
      "returns": tr.returns_BxN,
  }


def ppo_loss(policy_params, value_params, mb, *, policy_cfg, value_cfg, hp: UpdateHParams):
  """Total loss and metrics for one minibatch."""
  rmask = mb["response_mask"].astype(bool)
  N = rmask.shape[1]
  logits = response_outputs(policy_cfg, policy_params, mb["tokens"], mb["mask"], N, "lm")
  logp = losses.logprobs_of(logits, mb["tokens"][:, -N:])
  entropy = losses.masked_mean(losses.entropy_from_logits(logits), rmask)
  values = response_outputs(value_cfg, value_params, mb["tokens"], mb["mask"], N, "score")
  pg, clipfrac, approx_kl = losses.policy_loss(logp, mb["old_logprobs"], mb["advantages"],
                                               rmask, hp.clip_eps)
  vf, vf_clipfrac = losses.value_loss(values, mb["old_values"], mb["returns"], rmask,
                                      hp.value_clip_eps)
  loss = pg + hp.vf_coef * vf - hp.ent_coef * entropy
  metrics = {"loss": loss, "policy_loss": pg, "value_loss": vf, "entropy": entropy,
             "clip_fraction": clipfrac, "value_clip_fraction": vf_clipfrac,
             "approx_kl": approx_kl}
  return loss, metrics


def init_state(policy_params, value_params, policy_tx, value_tx, mesh) -> dict:
  """Train state on `mesh`; optimizer moments inherit the parameters'
  shardings, scalars (step, counts) are replicated."""
  state = {
      "step": jnp.zeros((), jnp.int32),
      "policy": policy_params,
      "value": value_params,
      # Moments take their params' shardings (plain jit(tx.init) replicates them).
      "policy_opt": sharding.init_opt_state(policy_tx, policy_params, mesh),
      "value_opt": sharding.init_opt_state(value_tx, value_params, mesh),
  }
  return jax.device_put(state, state_shardings(state, mesh))


def state_shardings(state, mesh):
  """NamedSharding per leaf: the leaf's own when it lives on `mesh`, else replicated."""
  rep = sharding.replicated(mesh)

  def one(x):
    s = getattr(x, "sharding", None)
    if isinstance(s, jax.sharding.NamedSharding) and s.mesh == mesh:
      return s
    return rep
  return jax.tree_util.tree_map(one, state)


def make_update_fn(policy_cfg, value_cfg, policy_tx, value_tx, hp: UpdateHParams, mesh,
                   shardings, batch_size: int, rules=sharding.DEFAULT_RULES):
  """Jitted `(state, batch, rng) -> (state, metrics)` running hp.epochs passes."""
  if batch_size % hp.num_minibatches:
    raise ValueError(f"ppo: batch size {batch_size} is not divisible by "
                     f"num_minibatches={hp.num_minibatches}; change ppo.num_minibatches")
  mb_size = batch_size // hp.num_minibatches
  constrain = mb_size % sharding.batch_divisor(mesh, rules) == 0
  loss_fn = functools.partial(ppo_loss, policy_cfg=policy_cfg, value_cfg=value_cfg, hp=hp)
  grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)

  def minibatch_step(state, mb):
    if constrain:
      mb = jax.tree_util.tree_map(
          lambda x: jax.lax.with_sharding_constraint(
              x, sharding.batch_sharding(mesh, x.ndim, rules)), mb)
    (_, metrics), (g_pol, g_val) = grad_fn(state["policy"], state["value"], mb)
    upd_p, popt = policy_tx.update(g_pol, state["policy_opt"], state["policy"])
    upd_v, vopt = value_tx.update(g_val, state["value_opt"], state["value"])
    metrics = dict(metrics, policy_grad_norm=optax.global_norm(g_pol),
                   value_grad_norm=optax.global_norm(g_val))
    state = {"step": state["step"] + 1,
             "policy": optax.apply_updates(state["policy"], upd_p),
             "value": optax.apply_updates(state["value"], upd_v),
             "policy_opt": popt, "value_opt": vopt}
    return state, metrics

  @sharding.activation_sharding(mesh, rules)
  def update(state, batch, rng):
    def epoch(state, key):
      perm = jax.random.permutation(key, batch_size)
      shuffled = jax.tree_util.tree_map(
          lambda x: x[perm].reshape((hp.num_minibatches, mb_size) + x.shape[1:]), batch)
      return jax.lax.scan(minibatch_step, state, shuffled)

    state, metrics = jax.lax.scan(epoch, state, jax.random.split(rng, hp.epochs))
    # Means over every minibatch step of every epoch.
    return state, jax.tree_util.tree_map(jnp.mean, metrics)

  rep = sharding.replicated(mesh)
  batch_shardings = {k: batch_input_sharding(mesh, batch_size, rules)
                     for k in ("tokens", "mask", "response_mask", "old_logprobs",
                               "old_values", "advantages", "returns")}
  return jax.jit(update, in_shardings=(shardings, batch_shardings, rep),
                 out_shardings=(shardings, rep), donate_argnums=(0,))


def batch_input_sharding(mesh, batch_size: int, rules=sharding.DEFAULT_RULES):
  """Rows split over the batch axes, or replicated when they do not divide."""
  if batch_size % sharding.batch_divisor(mesh, rules):
    return sharding.replicated(mesh)
  return sharding.batch_sharding(mesh, 2, rules)
