"""Online iterated RLAIF: the preference model refreshed on the current policy's samples.

The paper trains its PM once, on the SL-CAI model's samples; as RL moves the policy
the PM judges responses it never saw. With `ppo.online.refresh_every` K > 0, RL
pauses after every K-th iteration:

1. the current policy answers fresh red-team prompts twice (a cursor of its own
   over the red-team prompts), and the feedback model labels each pair exactly as
   the label stage does (`feedback.sample_and_label` under `config.label`);
2. the PM is scored on the new labels (`before_*`: how far the policy had drifted
   from what the PM knew);
3. the PM trains `pm_steps` steps on a mix of the new labels, a replay draw of
   older AI labels (the label stage's and earlier refreshes') and the human
   helpfulness comparisons, with AdamW moments kept across refreshes;
4. it is scored again (`after_*`) and RL continues against it.

What a resumed run needs: the PM's train state (checkpointed beside the policy's),
the number of refreshes done and the prompt cursor (the checkpoint's JSON), and
the labels of every refresh (WORKDIR/ppo/online_labels.jsonl, rewritten whole at
each refresh, read back up to the refresh the checkpoint had done). Every draw of
refresh r comes from (seed, r), so a run killed mid-refresh redoes that refresh
and continues exactly as if never stopped.
"""
from __future__ import annotations

import time

import jax
import ml_collections
import numpy as np

from cai_jax import feedback, sharding as shd, utils
from cai_jax.rl import prompt_mix
from cai_jax.training import data, loop, objectives, optim, preferences
from cai_jax.training import state as state_lib
from cai_jax.utils import InputError


def default_config() -> ml_collections.ConfigDict:
  """The `ppo.online` section."""
  c = ml_collections.ConfigDict()
  c.refresh_every = 0          # RL iterations between PM refreshes; 0 = never (the paper's one PM)
  c.prompts_per_refresh = 32   # fresh red-team prompts per refresh, each answered twice
  c.pm_steps = 8               # PM optimizer steps per refresh
  c.pm_batch_size = 8          # pairs per PM step (and per scoring batch)
  c.replay_ratio = 1.0         # older AI labels replayed per new label in a refresh's mix
  c.human_fraction = -1.0      # share of human comparisons in the mix; -1 = config.pm's
  c.pm_optim = optim.default_optim_config()  # the PM's AdamW (moments persist across refreshes)
  c.pm_optim.learning_rate = 1e-5
  return c


def enabled(pc) -> bool:
  return "online" in pc and int(pc.online.refresh_every) > 0


def unused_fields(pc) -> tuple:
  """`ppo.online` fields that change nothing while refreshing is off."""
  if enabled(pc) or "online" not in pc:
    return ()
  return tuple(f"online.{k}" for k in pc.online.keys() if k != "refresh_every")


def point_reward(reward_fn, params) -> None:
  """Makes a PM reward (`rollout.PMReward`, or its per-axis wrapper) read `params`."""
  inner = getattr(reward_fn, "pm", reward_fn)
  inner.params = params
  reward_fn.params = params


class OnlinePM:
  """The refreshed PM: its train state, label buffer, prompt cursor and refresh step.

  pm_cfg/pm_params: the PM as the PM stage exported it (score head, no LM head).
  labeller: the feedback model's (`feedback.make_labeller`; per axis for a PM with a
  head per axis). prompts: red-team prompts {id, messages}. replay: the label
  stage's comparisons and human: the human comparisons, both encoded
  (`preferences.encode_pairs`).
  """

  def __init__(self, oc, *, pm_cfg, pm_params, encoder, labeller, label_section, prompts: list,
               replay: list, human: list, human_fraction: float, human_axis: str, max_len: int,
               fmt: str, sample_batch_size: int, mesh, rules, seed: int, num_iterations: int,
               labels_path: str, is_main: bool, calibration_bins: int = 10):
    self.oc, self.cfg, self.enc, self.labeller, self.lc = oc, pm_cfg, encoder, labeller, \
        label_section
    self.every = int(oc.refresh_every)
    self.B, self.L, self.fmt = int(oc.pm_batch_size), int(max_len), fmt
    self.sample_batch_size, self.mesh, self.rules, self.seed = sample_batch_size, mesh, rules, \
        int(seed)
    self.replay, self.human, self.human_axis = list(replay), list(human), human_axis
    self.human_fraction = float(human_fraction)
    self.labels_path, self.is_main, self.bins = labels_path, is_main, int(calibration_bins)
    self.pad = encoder.tok.pad_token_id if encoder.tok.pad_token_id is not None else (
        pm_cfg.pad_token_id or 0)
    n = int(oc.prompts_per_refresh)
    if n < 1 or int(oc.pm_steps) < 1 or self.B < 1:
      raise InputError("config.ppo.online: prompts_per_refresh, pm_steps and pm_batch_size must "
                       "be >= 1 (refresh_every=0 turns refreshing off)")
    d = shd.batch_divisor(mesh)
    if self.B % d:
      raise InputError(f"config.ppo.online.pm_batch_size={self.B} must be a multiple of the "
                       f"mesh's batch axes ({d} devices); use {-(-self.B // d) * d}")
    if not prompts:
      raise InputError("config.ppo.online: no red-team prompts to refresh the PM on; "
                       "give config.data.red_team prompts or set refresh_every=0")
    self.cursor = prompt_mix.PromptMix(prompts, [], 1.0, n, self.seed + 17)
    total = max(int(num_iterations) // self.every, 1) * int(oc.pm_steps)
    self.tx = optim.make_optimizer(oc.pm_optim, total)
    # A host copy: the step donates its state, which must share no buffer with the
    # value model the same PM may have initialised.
    host = jax.tree_util.tree_map(np.array, jax.device_get(pm_params))
    self.state = state_lib.create_train_state(host, self.tx, pm_cfg, mesh, rules)
    self._step = None
    self.refreshes = 0
    self.records: list = []   # label records of every refresh done
    self.fresh: list = []     # the same, encoded

  @property
  def params(self):
    return self.state.params

  def due(self, iteration: int, total: int) -> bool:
    """After this iteration? Never after the last one: no RL would read the result."""
    return iteration % self.every == 0 and iteration < total

  def _encode(self, recs: list) -> list:
    items = [preferences.ai_pair(r, f"{self.labels_path} (refresh {r['refresh']})")
             for r in recs]
    if self.cfg.score_labels:
      preferences.axis_labels(items, [], self.cfg.score_labels, self.human_axis,
                              self.labels_path)
    return preferences.encode_pairs(self.enc, items, self.L, self.seed)

  def _score(self, pairs: list) -> dict:
    ev = preferences.evaluate_pairs(self.cfg, self.state.params, pairs, self.L, self.pad, self.B,
                                    self.mesh, self.rules, self.bins)
    return {k: float(v) for k, v in ev.items() if np.ndim(v) == 0}

  def _train_step(self, example: dict):
    if self._step is None:
      self._step = loop.make_train_step(objectives.pm_loss_fn(self.cfg), self.tx, self.state,
                                        self.mesh, example, rules=self.rules)
    return self._step

  def refresh(self, iteration: int, policy_cfg, policy_params, tokenizer) -> dict:
    """One refresh after `iteration`, sampling from `policy_params` (unrolled, merged);
    returns its metrics (`online/...`)."""
    t0 = time.perf_counter()
    r = self.refreshes + 1
    key = jax.random.fold_in(jax.random.PRNGKey(self.seed + 23), r)
    k_label, k_train = jax.random.split(key)
    prompts = self.cursor.next_batch()
    recs = feedback.sample_and_label(policy_cfg, policy_params, tokenizer, self.fmt,
                                     self.labeller, prompts, self.lc, k_label,
                                     self.sample_batch_size, self.mesh)
    recs = [dict(x, refresh=r, iteration=int(iteration)) for x in recs]
    new = self._encode(recs)
    before = self._score(new)
    old = self.replay + self.fresh
    rng = np.random.default_rng([self.seed, r, 3])
    n_old = min(len(old), int(round(len(new) * float(self.oc.replay_ratio))))
    ai = new + [old[i] for i in rng.permutation(len(old))[:n_old]]
    train = preferences.mix(ai, self.human, self.human_fraction, self.seed + r)
    if len(train) < self.B:
      raise InputError(f"config.ppo.online: a refresh's mix has {len(train)} pairs, fewer than "
                       f"pm_batch_size={self.B}; raise prompts_per_refresh or lower "
                       "pm_batch_size")
    index = data.ShuffledIndex(len(train), self.B, self.seed + r)
    step_losses = []
    for s in range(int(self.oc.pm_steps)):
      host = data.pair_batch([train[i] for i in next(index)], self.L, self.pad)
      step = self._train_step(host)
      self.state, m = step(self.state, shd.shard_batch(host, self.mesh, self.rules),
                           jax.random.fold_in(k_train, s))
      step_losses.append(m["loss"])
    losses = np.asarray(jax.device_get(step_losses), np.float64)
    if not np.all(np.isfinite(losses)):
      raise loop.TrainingDivergedError(
          f"ppo.online: non-finite PM loss in refresh {r}; lower "
          "config.ppo.online.pm_optim.learning_rate")
    after = self._score(new)
    self.records += recs
    self.fresh += new
    self.refreshes = r
    if self.is_main:
      utils.write_jsonl(self.labels_path, self.records)
    p = np.array([x["p_a"] for x in recs], np.float64)
    out = {"online/refresh": r, "online/new_labels": len(recs), "online/replayed": n_old,
           "online/train_pairs": len(train), "online/label_buffer": len(old) + len(new),
           "online/mean_confidence": float(np.mean(np.abs(p - 0.5)) + 0.5),
           "online/pm_loss": float(losses.mean()),
           **{f"online/before_{k}": v for k, v in before.items()},
           **{f"online/after_{k}": v for k, v in after.items()},
           "time/refresh": time.perf_counter() - t0}
    return out

  def state_dict(self) -> dict:
    return {"refreshes": self.refreshes, "prompts": self.cursor.state_dict()}

  def load_state_dict(self, d: dict) -> None:
    """Restores the cursor and refresh count, and the labels of the refreshes done
    (a refresh the checkpoint had not finished is dropped and redone)."""
    self.refreshes = int(d["refreshes"])
    self.cursor.load_state_dict(d["prompts"])
    recs = list(utils.read_jsonl(self.labels_path)) if utils.exists(self.labels_path) else []
    self.records = [x for x in recs if int(x.get("refresh", 0)) <= self.refreshes]
    if len({x["refresh"] for x in self.records}) != self.refreshes:
      raise InputError(f"{self.labels_path}: holds the labels of "
                       f"{len({x['refresh'] for x in self.records})} refreshes, the checkpoint "
                       f"has done {self.refreshes}; restore the file or start a fresh --workdir")
    self.fresh = self._encode(self.records)
