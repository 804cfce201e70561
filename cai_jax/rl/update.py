"""The RL update: K epochs over shuffled minibatches in one jitted call.

`make_update_fn` returns a pure `(state, batch, rng, beta) -> (state, metrics)`
compiled with explicit NamedSharding in/out shardings and the state donated.
For PPO the state is a dict {"step", "policy", "value", "policy_opt",
"value_opt"}; policy and value are separate parameter trees (the value model
may be a different model: by default it starts from the preference model) each
with its own optimizer. The critic-free algorithms (GRPO, RLOO: `critic=False`)
hold {"step", "policy", "policy_opt"} only: no value model exists.

The batch is the full sequence (left-padded prompt of length P followed by a
right-padded response of length N) and per-response-token arrays; logits and
values for response token t are read at position P−1+t.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from cai_jax import models, sharding
from cai_jax.rl import losses
from cai_jax.training import accumulate


class UpdateHParams(NamedTuple):
  epochs: int = 4               # passes over the rollout batch
  num_minibatches: int = 4      # minibatches per pass
  clip_eps: float = 0.2         # policy ratio clip
  value_clip_eps: float = 0.2   # value clip around the rollout values
  vf_coef: float = 0.5          # weight of the value loss
  ent_coef: float = 0.0         # weight of the entropy bonus
  critic: bool = True           # PPO's value model; False for GRPO / RLOO
  kl_in_loss: bool = False      # β·k3(π, π_ref) as a loss term (GRPO) instead of in the reward
  micro_batches: int = 1        # gradient accumulation within a minibatch (same update)


def response_outputs(cfg, params, tokens_BxL, mask_BxL, num_response: int, head: str):
  """Logits (head="lm") or values (head="score") at the positions that predict
  / precede each of the last `num_response` tokens: BxNxV or BxN."""
  L = tokens_BxL.shape[1]
  P = L - num_response
  pos = models.positions_from_mask(mask_BxL)
  out = models.forward(cfg, params, tokens_BxL, pos, mask_BxL, heads=(head,))
  key = "logits" if head == "lm" else "scores"
  return out[key][:, P - 1:L - 1]


def batch_keys(hp: UpdateHParams) -> tuple:
  """The per-row arrays the update reads."""
  keys = ("tokens", "mask", "response_mask", "old_logprobs", "advantages")
  if hp.critic:
    keys += ("old_values", "returns")
  if hp.kl_in_loss:
    keys += ("ref_logprobs",)
  return keys


def example_batch(hp: UpdateHParams, batch_size: int, prompt_len: int, response_len: int) -> dict:
  """ShapeDtypeStructs of the batch the update reads (for lowering without data)."""
  B, N = batch_size, response_len
  L = prompt_len + N
  every = {"tokens": ((B, L), jnp.int32), "mask": ((B, L), jnp.bool_),
           "response_mask": ((B, N), jnp.bool_)}
  return {k: jax.ShapeDtypeStruct(*every.get(k, ((B, N), jnp.float32))) for k in batch_keys(hp)}


def batch_from_transition(tr: losses.Transition, hp: UpdateHParams = UpdateHParams()) -> dict:
  """The arrays the update reads, as a dict of batch-major arrays."""
  every = {
      "tokens": jnp.concatenate([tr.prompt_tokens_BxP, tr.response_tokens_BxN], axis=1),
      "mask": jnp.concatenate([tr.prompt_mask_BxP, tr.response_mask_BxN], axis=1),
      "response_mask": tr.response_mask_BxN,
      "old_logprobs": tr.logprobs_BxN,
      "old_values": tr.values_BxN,
      "advantages": tr.advantages_BxN,
      "returns": tr.returns_BxN,
      "ref_logprobs": tr.ref_logprobs_BxN,
  }
  return {k: every[k] for k in batch_keys(hp)}


def policy_terms(policy_params, mb, beta, *, policy_cfg, hp: UpdateHParams):
  """The policy's part of the loss for one minibatch: the clipped surrogate, the
  entropy bonus and (kl_in_loss) β times the mean per-token k3 to the reference."""
  rmask = mb["response_mask"].astype(bool)
  N = rmask.shape[1]
  logits = response_outputs(policy_cfg, policy_params, mb["tokens"], mb["mask"], N, "lm")
  logp = losses.logprobs_of(logits, mb["tokens"][:, -N:])
  entropy = losses.masked_mean(losses.entropy_from_logits(logits), rmask)
  pg, clipfrac, approx_kl = losses.policy_loss(logp, mb["old_logprobs"], mb["advantages"],
                                               rmask, hp.clip_eps)
  loss = pg - hp.ent_coef * entropy
  metrics = {"policy_loss": pg, "entropy": entropy, "clip_fraction": clipfrac,
             "approx_kl": approx_kl}
  if hp.kl_in_loss:
    k3 = losses.masked_mean(losses.k3_per_token(logp, mb["ref_logprobs"]), rmask)
    loss = loss + beta * k3
    metrics["kl_loss"] = k3
  return loss, metrics


def ppo_loss(policy_params, value_params, mb, beta=0.0, *, policy_cfg, value_cfg,
             hp: UpdateHParams):
  """Total loss and metrics for one minibatch."""
  loss, metrics = policy_terms(policy_params, mb, beta, policy_cfg=policy_cfg, hp=hp)
  rmask = mb["response_mask"].astype(bool)
  N = rmask.shape[1]
  values = response_outputs(value_cfg, value_params, mb["tokens"], mb["mask"], N, "score")
  vf, vf_clipfrac = losses.value_loss(values, mb["old_values"], mb["returns"], rmask,
                                      hp.value_clip_eps)
  loss = loss + hp.vf_coef * vf
  metrics = dict(metrics, loss=loss, value_loss=vf, value_clip_fraction=vf_clipfrac)
  return loss, metrics


def critic_free_loss(policy_params, mb, beta=0.0, *, policy_cfg, hp: UpdateHParams):
  loss, metrics = policy_terms(policy_params, mb, beta, policy_cfg=policy_cfg, hp=hp)
  return loss, dict(metrics, loss=loss)


def init_state(policy_params, value_params, policy_tx, value_tx, mesh) -> dict:
  """Train state on `mesh`; optimizer moments inherit the parameters'
  shardings, scalars (step, counts) are replicated. value_params None: the
  critic-free state (no value model, no value optimizer)."""
  state = {
      "step": jnp.zeros((), jnp.int32),
      "policy": policy_params,
      # Moments take their params' shardings (plain jit(tx.init) replicates them).
      "policy_opt": sharding.init_opt_state(policy_tx, policy_params, mesh),
  }
  if value_params is not None:
    state["value"] = value_params
    state["value_opt"] = sharding.init_opt_state(value_tx, value_params, mesh)
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
                   shardings, batch_size: int, rules=sharding.DEFAULT_RULES, trainable=None):
  """Jitted `(state, batch, rng, beta) -> (state, metrics)` running hp.epochs
  passes. beta is the KL coefficient of a kl_in_loss update (unused otherwise).
  trainable: params -> bool tree; frozen params enter the loss behind stop_gradient,
  so no gradient is computed for them (LoRA's base, layers below train_top_layers)."""
  if batch_size % hp.num_minibatches:
    raise ValueError(f"ppo: batch size {batch_size} is not divisible by "
                     f"num_minibatches={hp.num_minibatches}; change ppo.num_minibatches")
  mb_size = batch_size // hp.num_minibatches
  if mb_size % hp.micro_batches:
    raise ValueError(f"ppo: minibatch of {mb_size} rows does not split into "
                     f"{hp.micro_batches} micro-batches; change ppo.micro_batches")
  constrain = mb_size % sharding.batch_divisor(mesh, rules) == 0
  # Every loss term is a mean over response tokens: micro-batches weigh by their count.
  acc = dict(weight_of=lambda mb: jnp.sum(mb["response_mask"]), mesh=mesh, rules=rules)
  def frozen(params):
    if trainable is None:
      return params
    return jax.tree_util.tree_map(lambda p, t: p if t else jax.lax.stop_gradient(p), params,
                                  trainable(params))

  if hp.critic:
    def loss_fn(policy, value, mb, beta):
      return ppo_loss(frozen(policy), frozen(value), mb, beta, policy_cfg=policy_cfg,
                      value_cfg=value_cfg, hp=hp)
    grad_fn = accumulate.value_and_grad(loss_fn, hp.micro_batches, argnums=(0, 1), **acc)
  else:
    def loss_fn(policy, mb, beta):
      return critic_free_loss(frozen(policy), mb, beta, policy_cfg=policy_cfg, hp=hp)
    grad_fn = accumulate.value_and_grad(loss_fn, hp.micro_batches, **acc)

  def minibatch_step(carry, mb):
    state, beta = carry
    if constrain:
      mb = jax.tree_util.tree_map(
          lambda x: jax.lax.with_sharding_constraint(
              x, sharding.batch_sharding(mesh, x.ndim, rules)), mb)
    new = {"step": state["step"] + 1}
    if hp.critic:
      (_, metrics), (g_pol, g_val) = grad_fn(state["policy"], state["value"], mb, beta)
      upd_v, new["value_opt"] = value_tx.update(g_val, state["value_opt"], state["value"])
      new["value"] = optax.apply_updates(state["value"], upd_v)
      metrics = dict(metrics, value_grad_norm=optax.global_norm(g_val))
    else:
      (_, metrics), g_pol = grad_fn(state["policy"], mb, beta)
    upd_p, new["policy_opt"] = policy_tx.update(g_pol, state["policy_opt"], state["policy"])
    new["policy"] = optax.apply_updates(state["policy"], upd_p)
    metrics = dict(metrics, policy_grad_norm=optax.global_norm(g_pol))
    return (new, beta), metrics

  @sharding.activation_sharding(mesh, rules)
  def update(state, batch, rng, beta):
    def epoch(carry, key):
      perm = jax.random.permutation(key, batch_size)
      shuffled = jax.tree_util.tree_map(
          lambda x: x[perm].reshape((hp.num_minibatches, mb_size) + x.shape[1:]), batch)
      return jax.lax.scan(minibatch_step, carry, shuffled)

    (state, _), metrics = jax.lax.scan(epoch, (state, jnp.asarray(beta, jnp.float32)),
                                       jax.random.split(rng, hp.epochs))
    # Means over every minibatch step of every epoch.
    return state, jax.tree_util.tree_map(jnp.mean, metrics)

  rep = sharding.replicated(mesh)
  batch_shardings = {k: batch_input_sharding(mesh, batch_size, rules) for k in batch_keys(hp)}
  return jax.jit(update, in_shardings=(shardings, batch_shardings, rep, rep),
                 out_shardings=(shardings, rep), donate_argnums=(0,))


def batch_input_sharding(mesh, batch_size: int, rules=sharding.DEFAULT_RULES):
  """Rows split over the batch axes, or replicated when they do not divide."""
  if batch_size % sharding.batch_divisor(mesh, rules):
    return sharding.replicated(mesh)
  return sharding.batch_sharding(mesh, 2, rules)
