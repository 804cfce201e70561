"""Rollout: sample responses, score them, and turn scores into advantages.

A rollout batch is a left-padded prompt block (BxP) followed by a
right-padded response block (BxN); `response_mask_BxN` marks the generated
tokens up to and including EOS (or a stop sequence). Everything after that is
padding and is masked out of rewards, values, KL and losses.

The reward sits on the last real response token (the EOS when the response
finished) — never on a pad token — and a response that hit the length limit
without EOS gets `missing_eos_penalty` subtracted from its score.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from cai_jax.rl import losses
from cai_jax.rl.update import response_outputs


class RolloutHParams(NamedTuple):
  max_new_tokens: int = 64       # response length limit
  temperature: float = 1.0       # sampling temperature (PPO samples from π itself: 1.0)
  eos_ids: tuple = (2,)          # tokens that end a response
  stop_seqs: object = ()         # token sequences (or a sampling.StopMatcher) ending a response
  gamma: float = 1.0             # discount over response tokens
  lam: float = 0.95              # GAE λ
  missing_eos_penalty: float = 1.0   # subtracted from the score when no EOS arrived
  whiten_advantages: bool = True     # advantages → zero mean, unit variance over real tokens
  algorithm: str = "ppo"         # "ppo" (value model + GAE) or "grpo" / "rloo" (group baselines)
  group_size: int = 1            # grpo/rloo: consecutive rows answering the same prompt
  group_std: bool = True         # grpo: scale by the group's std (False: Dr. GRPO)
  kl_in_loss: bool = False       # critic-free: β·k3 is a loss term, not subtracted from rewards


def response_mask_from_lengths(lengths_B, n: int):
  return jnp.arange(n)[None, :] < lengths_B[:, None]


def response_texts(tokenizer, batch, eos_ids, stop_strings) -> list:
  """The sampled responses as every stage decodes samples: EOS dropped, cut at the
  first stop string, stripped."""
  from cai_jax import sampling
  resp = np.asarray(jax.device_get(batch["response_tokens"]))
  lengths = np.asarray(jax.device_get(batch["response_mask"])).sum(axis=1)
  return [sampling.completion_text(tokenizer, resp[i, :int(n)], True, eos_ids,
                                   stop_strings)[0].strip()
          for i, n in enumerate(lengths)]


def prompt_key(messages) -> str:
  """A prompt's identity for per-prompt tables (the AI reward's baselines)."""
  import json
  return json.dumps(messages, sort_keys=True, ensure_ascii=False)


class PMReward:
  """The preference model's score of each sampled conversation, read exactly where
  the PM stage trained it and every evaluation reads it.

  The sampled tokens are decoded as every stage decodes samples (EOS dropped, cut
  at the first stop string, stripped), and the conversation (prompt messages,
  response text) is encoded again by the one conversation encoder: the score is
  that of `python -m cai_jax.evaluation.score` for the same conversation. The
  KL penalty and advantages stay in the policy's own token space.
  """

  def __init__(self, pm_cfg, pm_params, encoder, eos_ids, stop_strings, max_len: int):
    self.cfg, self.params, self.enc = pm_cfg, pm_params, encoder
    self.eos_ids, self.stop_strings, self.max_len = tuple(eos_ids), list(stop_strings), max_len
    self.last_texts: list = []

  def __call__(self, batch):
    from cai_jax import sampling
    prompts = batch.get("prompts")
    if prompts is None:
      raise ValueError("PMReward needs the prompts' messages (batch['prompts'])")
    self.last_texts = response_texts(self.enc.tok, batch, self.eos_ids, self.stop_strings)
    return sampling.pm_scores(self.cfg, self.params, self.enc, prompts, self.last_texts,
                              max_len=self.max_len)


class AxisWeightedReward:
  """The reward of a PM with a head per axis: its axes' scores combined by
  `control.AxisWeights` (per-axis running standardisation, configured weights).
  `last_metrics` holds each axis's mean raw score of the last batch."""

  def __init__(self, pm_reward: PMReward, combine):
    self.pm, self.combine = pm_reward, combine
    self.params = pm_reward.params
    self.last_metrics: dict = {}

  def __call__(self, batch):
    s = np.asarray(self.pm(batch), np.float64)
    self.last_metrics = {f"score_{n}": float(s[:, j].mean())
                         for j, n in enumerate(self.combine.names)}
    return self.combine(s)

  def state_dict(self) -> dict:
    return self.combine.state_dict()

  def load_state_dict(self, d: dict) -> None:
    self.combine.load_state_dict(d)


class AIReward:
  """The feedback model's judgement as the reward, with no PM (direct RLAIF).

  Each sampled response is compared with the starting policy's greedy response to
  the same prompt (`baselines`, computed once per run) in the label stage's
  multiple-choice question (`feedback.Labeller`: a principle drawn per sample,
  `num_principles` draws averaged, both option orders when debiasing, chain of
  thought if configured). The reward is the normalised probability that the sample
  is the better one: 0.5 means "as good as where RL started".

  `step` (set by the caller before each rollout) seeds the principle draws, so a
  resumed run draws the same principles.
  """

  def __init__(self, labeller, tokenizer, eos_ids, stop_strings, baselines: dict, seed: int):
    self.labeller, self.tok = labeller, tokenizer
    self.eos_ids, self.stop_strings = tuple(eos_ids), list(stop_strings)
    self.baselines, self.seed, self.step = baselines, int(seed), 0
    self.last_texts: list = []

  def __call__(self, batch):
    prompts = batch.get("prompts")
    if prompts is None:
      raise ValueError("AIReward needs the prompts' messages (batch['prompts'])")
    self.last_texts = response_texts(self.tok, batch, self.eos_ids, self.stop_strings)
    items = [{"prompt": m, "response_a": t, "response_b": self.baselines[prompt_key(m)]}
             for m, t in zip(prompts, self.last_texts)]
    rng = np.random.default_rng([self.seed, 17, self.step])
    recs = self.labeller(items, rng, seed=self.seed * 1000003 + self.step)
    return np.asarray([r["p_a"] for r in recs], np.float32)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _forward_all(policy_cfg, ref_cfg, value_cfg, policy_params, ref_params, value_params,
                 tokens_BxL, mask_BxL, response_tokens_BxN, response_mask_BxN):
  """Policy and reference log-probs, values (zeros without a value model) and the
  policy's mean entropy over the response tokens."""
  N = response_tokens_BxN.shape[1]
  logits = response_outputs(policy_cfg, policy_params, tokens_BxL, mask_BxL, N, "lm")
  logp = losses.logprobs_of(logits, response_tokens_BxN)
  entropy = losses.entropy_from_logits(logits)
  ref_logits = response_outputs(ref_cfg, ref_params, tokens_BxL, mask_BxL, N, "lm")
  ref_logp = losses.logprobs_of(ref_logits, response_tokens_BxN)
  if value_cfg is None:
    values = jnp.zeros(response_mask_BxN.shape, jnp.float32)
  else:
    values = response_outputs(value_cfg, value_params, tokens_BxL, mask_BxL, N, "score")
  m = response_mask_BxN
  return (jnp.where(m, logp, 0.0), jnp.where(m, ref_logp, 0.0), jnp.where(m, values, 0.0),
          losses.masked_mean(entropy, m))


@functools.partial(jax.jit, static_argnames=("gamma", "lam", "whiten_advantages"))
def advantages_from_scores(scores_B, logprobs_BxN, ref_logprobs_BxN, values_BxN, mask_BxN,
                           beta, *, gamma: float, lam: float, whiten_advantages: bool):
  """Per-token rewards (KL penalty + score at the last real token), GAE, and
  the KL/value diagnostics of the batch."""
  rewards, kl_BxN = losses.token_rewards(scores_B, logprobs_BxN, ref_logprobs_BxN, mask_BxN,
                                         beta)
  adv, returns = losses.gae(rewards, values_BxN, mask_BxN, gamma, lam)
  if whiten_advantages:
    adv = losses.whiten(adv, mask_BxN)
  k1, k3 = losses.kl_estimators(logprobs_BxN, ref_logprobs_BxN, mask_BxN)
  diag = {
      "kl": k1, "kl_k3": k3,
      "kl_penalty": -beta * k1,
      "explained_variance": losses.explained_variance(values_BxN, returns, mask_BxN),
      "value_mean": losses.masked_mean(values_BxN, mask_BxN),
      "return_mean": losses.masked_mean(returns, mask_BxN),
      "kl_token_min": jnp.min(jnp.where(mask_BxN, kl_BxN, jnp.inf)),
  }
  return rewards, adv, returns, diag


@functools.partial(jax.jit, static_argnames=("algorithm", "group_size", "group_std",
                                             "kl_in_loss"))
def group_advantages_from_scores(scores_B, logprobs_BxN, ref_logprobs_BxN, mask_BxN, beta, *,
                                 algorithm: str, group_size: int, group_std: bool,
                                 kl_in_loss: bool):
  """Critic-free advantages: each sequence's reward (its score, minus β·Σ k1 when
  the KL sits in the reward) against its prompt group's baseline, the same value
  on every real token of the sequence. Returns (rewards_BxN, adv, returns, diag)
  shaped as PPO's; the per-token rewards and returns are what a logger reads (the
  sequence reward on the last real token), not a training target."""
  seq_kl = losses.sequence_kl(logprobs_BxN, ref_logprobs_BxN, mask_BxN)
  seq_reward = scores_B if kl_in_loss else scores_B - beta * seq_kl
  adv_B = losses.group_advantages(seq_reward, group_size, algorithm, group_std)
  mask = mask_BxN.astype(bool)
  adv = jnp.where(mask, adv_B[:, None], 0.0)
  zeros = jnp.zeros_like(logprobs_BxN)
  rewards, _ = losses.token_rewards(seq_reward, zeros, zeros, mask, 0.0)
  k1, k3 = losses.kl_estimators(logprobs_BxN, ref_logprobs_BxN, mask_BxN)
  diag = {"kl": k1, "kl_k3": k3, "kl_penalty": 0.0 * k1 if kl_in_loss else -beta * k1,
          "advantage_abs_mean": jnp.mean(jnp.abs(adv_B)),
          "group_reward_std": jnp.mean(jnp.std(seq_reward.reshape(-1, group_size), axis=1)),
          "kl_token_min": jnp.min(jnp.where(mask, logprobs_BxN - ref_logprobs_BxN, jnp.inf))}
  return rewards, adv, rewards, diag


def reward_model_params(reward_fn):
  """The params a reward holds resident (a PM, an AI reward's feedback model), or None."""
  if isinstance(reward_fn, AIReward):
    return getattr(reward_fn.labeller, "params", None)
  return getattr(reward_fn, "params", None)


class Rollout:
  """Generates and scores one batch; holds the frozen reference and reward.

  `sample_fn(params, prompt_tokens_BxP, prompt_mask_BxP, rng) -> SampleOutput`
  defaults to the continuous-batching engine at the configured temperature; `reward_fn(batch)
  -> scores_B` reads `batch["tokens"/"mask"/"response_tokens"/"response_mask"]`.
  """

  def __init__(self, policy_cfg, ref_cfg, ref_params, value_cfg, reward_fn, hp: RolloutHParams,
               mesh=None, sample_fn: Optional[Callable] = None, normalizer=None,
               sample_cfg=None):
    """sample_cfg: the config the default sampler decodes with (the unrolled
    layout of a policy trained scanned), else policy_cfg."""
    self.policy_cfg, self.ref_cfg, self.value_cfg = policy_cfg, ref_cfg, value_cfg
    self.sample_cfg = policy_cfg if sample_cfg is None else sample_cfg
    self.ref_params = ref_params
    self.reward_fn = reward_fn
    self.hp = hp
    self.mesh = mesh
    self.normalizer = normalizer
    self.sample_fn = sample_fn or self._default_sample

  def _default_sample(self, params, prompt_tokens, prompt_mask, rng):
    """The batch decoded by the continuous-batching engine with one slot per
    row: one policy version, all rows admitted at once (no refills), and the
    rows still decoding move into half as many slots as others stop. Row b
    gets the key `row_keys(rng, b)`, as `sampling.sample` gives it."""
    from cai_jax import multihost
    from cai_jax.sampling import engine
    tokens = np.asarray(multihost.to_host(prompt_tokens))
    mask = np.asarray(multihost.to_host(prompt_mask), bool)
    return engine.generate_tokens(
        self.sample_cfg, params, [t[m] for t, m in zip(tokens, mask)], rng,
        slots=len(tokens), max_new_tokens=self.hp.max_new_tokens,
        temperature=self.hp.temperature, eos_ids=tuple(self.hp.eos_ids),
        stop_seqs=self.hp.stop_seqs, mesh=self.mesh)

  def __call__(self, policy_params, value_params, prompt_tokens_BxP, prompt_mask_BxP, rng,
               beta: float, clock=None, prompts=None, ref_params=None, sample_params=None):
    """Returns (Transition, metrics dict of floats, timings dict of seconds).

    prompts: the prompts' message lists, for rewards read from text (PMReward).
    ref_params: the reference for this call (a LoRA policy's base), else the held one.
    sample_params: the policy to decode with (a LoRA policy merged once), else
    policy_params, which always gives the log-probs the update's ratio starts from."""
    import time
    clock = clock or time.perf_counter
    timings = {}
    t0 = clock()
    prompt_tokens_BxP = jnp.asarray(prompt_tokens_BxP, jnp.int32)
    prompt_mask_BxP = jnp.asarray(prompt_mask_BxP, bool)
    out = self.sample_fn(policy_params if sample_params is None else sample_params,
                         prompt_tokens_BxP, prompt_mask_BxP, rng)
    resp = jnp.asarray(out.tokens_BxN, jnp.int32)
    lengths = jnp.asarray(out.lengths_B, jnp.int32)
    finished = jnp.asarray(out.finished_B, bool)
    rmask = response_mask_from_lengths(lengths, resp.shape[1])
    resp = jax.block_until_ready(resp)
    timings["generate"] = clock() - t0

    t0 = clock()
    batch = {"tokens": jnp.concatenate([prompt_tokens_BxP, resp], axis=1),
             "mask": jnp.concatenate([prompt_mask_BxP, rmask], axis=1),
             "response_tokens": resp, "response_mask": rmask, "prompts": prompts}
    raw_scores = np.asarray(jax.device_get(self.reward_fn(batch)), np.float32)
    timings["reward"] = clock() - t0

    t0 = clock()
    logp, ref_logp, values, entropy = _forward_all(
        self.policy_cfg, self.ref_cfg, self.value_cfg, policy_params,
        self.ref_params if ref_params is None else ref_params,
        value_params, batch["tokens"], batch["mask"], resp, rmask)
    scores = raw_scores
    if self.normalizer is not None:
      self.normalizer.update(raw_scores)
      scores = self.normalizer.normalize(raw_scores)
    finished_np = np.asarray(jax.device_get(finished))
    scores = scores - np.where(finished_np, 0.0, self.hp.missing_eos_penalty).astype(np.float32)
    if self.hp.algorithm == "ppo":
      rewards, adv, returns, diag = advantages_from_scores(
          jnp.asarray(scores), logp, ref_logp, values, rmask, jnp.float32(beta),
          gamma=float(self.hp.gamma), lam=float(self.hp.lam),
          whiten_advantages=bool(self.hp.whiten_advantages))
    else:
      rewards, adv, returns, diag = group_advantages_from_scores(
          jnp.asarray(scores), logp, ref_logp, rmask, jnp.float32(beta),
          algorithm=self.hp.algorithm, group_size=int(self.hp.group_size),
          group_std=bool(self.hp.group_std), kl_in_loss=bool(self.hp.kl_in_loss))
    tr = losses.Transition(prompt_tokens_BxP, prompt_mask_BxP, resp, rmask, logp, ref_logp,
                           values, rewards, adv, returns, jnp.asarray(scores),
                           jnp.asarray(raw_scores))
    diag = jax.device_get(diag)
    # Agreement between the sampler's log-probs and the full forward pass: a
    # large gap means the cache/padding paths disagree and the ratio is biased.
    sampler_gap = jnp.max(jnp.where(rmask, jnp.abs(jnp.asarray(out.logprobs_BxN) - logp), 0.0))
    lengths_np = np.asarray(jax.device_get(lengths))
    metrics = {
        "reward": float(raw_scores.mean()),
        "reward_std": float(raw_scores.std()),
        "score": float(scores.mean()),
        "entropy_rollout": float(entropy),
        "response_length": float(lengths_np.mean()),
        "finished_fraction": float(finished_np.mean()),
        "sampler_logprob_gap": float(sampler_gap),
        **{k: float(v) for k, v in diag.items()},
        **getattr(self.reward_fn, "last_metrics", {}),
    }
    timings["forward"] = clock() - t0
    timings["generated_tokens"] = int(lengths_np.sum())
    return tr, metrics, timings
