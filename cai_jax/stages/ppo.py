"""RL-CAI: PPO (or GRPO / RLOO) of the SL-CAI policy against the preference model.

Policy and the frozen reference start from the SL-CAI model (`ppo.init_from`,
by default WORKDIR/sft); the reward is the frozen preference model (WORKDIR/pm)
read where the PM stage trained it (`rl.rollout.PMReward`); for PPO the value
model starts from the PM (or the policy). `ppo.algorithm=grpo|rloo` samples
`group_size` responses per prompt and uses the group as the baseline: no value
model is loaded, trained or exported. `ppo.reward=ai` replaces the PM with the
feedback model's own judgement (`rl.rollout.AIReward`: the label stage's
question, comparing each sample with the starting policy's greedy response,
computed once into baselines.jsonl). `ppo.online.refresh_every` K > 0 refreshes
the PM every K iterations on the current policy's freshly labelled samples
(`rl.online`: online iterated RLAIF). Everything shares one mesh.

Writes WORKDIR/ppo/: metrics.jsonl (one line per iteration), samples.jsonl
(every sample of every iteration with the PM score it was rewarded with), tb/
(TensorBoard), curves.png, checkpoints/ (the whole state: policy, value, their
optimizers, β, reward normaliser, RNG and prompt position, and with online
refreshes the PM, its optimizer, its prompt position and refresh count; a killed
run resumes exactly), final/ (policy, HF format), for PPO value_final/ (value
model), with online refreshes online_labels.jsonl (every refresh's labels) and
pm_final/ (the last refreshed PM), then DONE.

  python -m cai_jax.main --config=configs/tiny.py --workdir=/tmp/cai \\
      --config.stages=ppo
"""
from __future__ import annotations

import logging

import jax
import ml_collections
import numpy as np

from cai_jax import constitution as constitution_lib
from cai_jax import feedback, interrupts, models, sampling as sampling_lib, sharding, utils
from cai_jax.models import lora
from cai_jax.data import prompts as prompts_lib
from cai_jax.rl import config as rl_config
from cai_jax.rl import control, online as online_lib, prompt_mix, rollout as rollout_lib
from cai_jax.rl import trainer as trainer_lib
from cai_jax.runtime import StageContext, stage_settings
from cai_jax.sampling import bucket_length, eos_ids_of, from_strings
from cai_jax.text import stop_strings
from cai_jax.training import fit as fit_lib, preferences, state as state_lib
from cai_jax.utils import InputError

STAGE = "ppo"
USES = ("seed", "model", "dtype", "frozen_dtype", "prompt_format", "data")
VOLATILE = ("checkpoint_every", "keep_checkpoints", "log_samples_every", "num_logged_samples",
            "tensorboard", "progress", "micro_batches")


def default_config() -> ml_collections.ConfigDict:
  """The `ppo` section (see cai_jax/rl/config.py for every field)."""
  return rl_config.ppo_section()


# Fields of config.label that do not change the AI reward's question.
LABEL_UNUSED = ("policy", "max_new_tokens", "temperature", "top_p", "split", "batch_size",
                "score_tokens", "chunk_size", "write_tfds", "progress", "per_axis")


# Fields of config.label that do not change an online refresh's labels (the pairs are
# the current policy's; the labeller is per axis exactly when the PM is).
ONLINE_LABEL_UNUSED = ("policy", "split", "batch_size", "score_tokens", "chunk_size",
                       "write_tfds", "progress", "per_axis")


def settings(config, workdir: str) -> dict:
  extra = {}
  pc = config.get("ppo", ml_collections.ConfigDict())
  if str(pc.get("reward", "pm")) == "ai" or online_lib.enabled(pc):
    const = constitution_lib.load(config.get("constitution", "harmlessness"))
    sha = {"constitution_sha": const.fingerprint()}
  if str(pc.get("reward", "pm")) == "ai":
    # The reward is the feedback model's answer to the label stage's question.
    extra["ai_reward"] = stage_settings(config, workdir, "label", ("feedback_model",),
                                        LABEL_UNUSED, sha)
  if online_lib.enabled(pc):
    # Refreshes label as the label stage does and mix in the PM stage's human data
    # (named to sort after the config fields: a refused resume names the field first).
    extra["refresh_labels"] = stage_settings(config, workdir, "label", ("feedback_model",),
                                            ONLINE_LABEL_UNUSED, sha)
    pm = config.get("pm", ml_collections.ConfigDict())
    extra["refresh_data"] = {k: preferences_settings(pm, k) for k in PM_DEFAULTS
                            if k != "calibration_bins"}
  return stage_settings(config, workdir, STAGE, USES, volatile(config), extra or None)


def volatile(config) -> tuple:
  """The section's fields that change none of the stage's results under `config`."""
  return VOLATILE + online_lib.unused_fields(config.get("ppo", ml_collections.ConfigDict()))


# What a refresh reads from config.pm (the replay labels and the human comparisons),
# with the PM stage's defaults for a config without that section.
PM_DEFAULTS = {"preferences": "", "human_data": (), "max_human_pairs": -1,
               "human_fraction": 0.5, "human_axis": "helpfulness", "calibration_bins": 10}


def preferences_settings(pm, field: str):
  value = pm.get(field, PM_DEFAULTS[field])
  return list(value) if isinstance(value, (tuple, list)) else value


def baselines(ctx, cfg, params, tok, prompts: list) -> dict:
  """The starting policy's greedy response to every prompt (the AI reward's other
  option), read from baselines.jsonl when an earlier run wrote it."""
  path = ctx.path("baselines.jsonl")
  if utils.exists(path):
    rows = list(utils.read_jsonl(path))
  else:
    pc = ctx.section
    comps = sampling_lib.generate(
        cfg, params, tok, [p["messages"] for p in prompts], fmt=ctx.fmt,
        max_new_tokens=int(pc.max_new_tokens), greedy=True, seed=ctx.seed,
        batch_size=int(pc.batch_size), mesh=sharding.mesh_from_config(ctx.config),
        progress=bool(pc.progress), truncate_long_prompts=True, desc="ppo baselines")
    rows = [{"id": p["id"], "kind": p["kind"], "key": rollout_lib.prompt_key(p["messages"]),
             "response": c.text.strip()} for p, c in zip(prompts, comps)]
    if ctx.is_main:
      utils.write_jsonl(path, rows)
  return {r["key"]: r["response"] for r in rows}


def encode_prompts(config, enc, kind: str) -> list:
  records = prompts_lib.load_prompts(config.data, kind=kind, split="train")
  return [{"id": r["id"], "kind": kind, "messages": r["messages"],
           "ids": enc.prompt_ids(r["messages"])} for r in records]


def _keep_short(prompts: list, limit: int, kind: str) -> list:
  kept = [p for p in prompts if 0 < len(p["ids"]) <= limit]
  if len(kept) < len(prompts):
    logging.warning("ppo: dropped %d of %d %s prompts longer than max_prompt_tokens=%d",
                    len(prompts) - len(kept), len(prompts), kind, limit)
  return kept


def plot_curves(metrics_path: str, png_path: str) -> None:
  """Reward and KL per iteration as a PNG."""
  import io
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = list(utils.read_jsonl(metrics_path))
  if not rows:
    return
  it = [r["iteration"] for r in rows]
  fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
  ax[0].plot(it, [r["reward"] for r in rows], marker="o")
  ax[0].set(xlabel="iteration", ylabel="PM reward (mean)", title="reward")
  ax[1].plot(it, [r["kl"] for r in rows], marker="o", label="k1 (mean log-ratio)")
  ax[1].plot(it, [r["kl_k3"] for r in rows], marker="x", label="k3 (non-negative)")
  ax[1].set(xlabel="iteration", ylabel="KL to reference (nats / sequence)", title="KL")
  ax[1].legend()
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=100)
  plt.close(fig)
  utils.atomic_write_bytes(png_path, buf.getvalue())


def run(config, workdir: str, reward_fn=None) -> dict:
  """Runs (or resumes) PPO; returns the summary written to DONE.

  reward_fn: optional replacement for the preference model (tests, ablations),
  `fn(batch) -> scores_B` over batch["tokens"/"mask"/"response_tokens"/
  "response_mask"/"prompts"].
  """
  from tqdm.auto import tqdm
  ctx = StageContext(config, workdir, STAGE, default_config())
  pc = ctx.section
  done = ctx.done()
  if done is not None:
    return done
  mesh = sharding.mesh_from_config(config)
  rules = sharding.rules_from_config(config)

  policy_spec, pcfg, pparams, tok = ctx.load_policy(pc.init_from, "ppo.init_from")
  enc = ctx.encoder(tok)
  stops = stop_strings(ctx.fmt, tok)
  eos = eos_ids_of(pcfg, tok)
  pm_len = int(pc.pm_max_len) or int(config.pm.max_len if "pm" in config else 512)
  critic = trainer_lib.has_critic(pc)
  ai_reward = reward_fn is None and str(pc.reward) == "ai"
  if (reward_fn is None and not ai_reward) or (critic and pc.value_init == "pm"):
    pm_path = ctx.role_spec("pm", pc.pm)
    pm_cfg, pm_params, _ = ctx.load(pm_path, heads=("lm", "score"), field="ppo.pm", seed_offset=1)
    if "score" not in models.heads_of(pm_cfg, pm_params):
      raise InputError(f"{pm_path}: preference model has no score head (score.weight); "
                       "export it from the pm stage")
    if pm_cfg.vocab_size != pcfg.vocab_size:
      raise InputError(f"{pm_path}: preference model vocabulary ({pm_cfg.vocab_size}) differs "
                       f"from the policy's ({pcfg.vocab_size}); use models sharing a tokenizer")
    pm_params = models.drop_heads(pm_params, ("score",))
  if not critic:
    vcfg, vparams = None, None
  elif pc.value_init == "pm" and pm_cfg.score_labels:
    # A PM with a head per axis: its trunk, with a fresh scalar head for the value.
    vcfg = pm_cfg.replace(score_labels=())
    vparams = models.add_score_head(vcfg, models.drop_heads(pm_params, ()))
  elif pc.value_init == "pm":
    vcfg, vparams = pm_cfg, pm_params
  elif pc.value_init == "policy":
    vcfg = pcfg
    vparams = models.drop_heads(models.add_score_head(pcfg, pparams), ("score",))
  else:
    raise InputError(f"config.ppo.value_init={pc.value_init!r}: use 'pm' or 'policy'")
  if lora.enabled(pc):  # adapters on the policy and the value model; their bases stay frozen
    lc = pc.lora
    pparams = lora.add(pparams, int(lc.rank), float(lc.alpha), tuple(lc.targets),
                       jax.random.PRNGKey(ctx.seed + 4))
    if vparams is not None:
      vparams = lora.add(vparams, int(lc.rank), float(lc.alpha), tuple(lc.targets),
                         jax.random.PRNGKey(ctx.seed + 5))
  online = online_lib.enabled(pc)
  if online and (reward_fn is not None or ai_reward):
    raise InputError("config.ppo.online.refresh_every needs the preference-model reward "
                     "(ppo.reward=pm): there is no PM to refresh; set refresh_every=0")
  refresher = None
  if reward_fn is None and not ai_reward:
    if online:  # the reward reads the PM as the refreshes train it (float32)
      refresher = _online_pm(ctx, config, pm_cfg, pm_params, enc, mesh, rules, pm_len)
      reward_fn = rollout_lib.PMReward(pm_cfg, refresher.params, enc, eos, stops, pm_len)
    else:
      rcfg, rparams = models.frozen_copy(pm_cfg, pm_params, ctx.frozen_dtype)
      pm_sharded = sharding.shard_params(rparams, rcfg, mesh, rules)
      reward_fn = rollout_lib.PMReward(rcfg, pm_sharded, enc, eos, stops, pm_len)
    if pm_cfg.score_labels:  # a head per axis: their weighted, standardised sum
      names = list(pm_cfg.score_labels)
      reward_fn = rollout_lib.AxisWeightedReward(reward_fn, control.AxisWeights(
          names, control.parse_axis_weights(pc.axis_weights, names)))

  # Prompts: a fixed padded length, so every iteration reuses one compilation.
  limit = min(int(pc.max_prompt_tokens), pcfg.max_position_embeddings - int(pc.max_new_tokens))
  red = _keep_short(encode_prompts(config, enc, "red_team"), limit, "red_team") \
      if pc.red_team_fraction > 0 else []
  helpful = _keep_short(encode_prompts(config, enc, "helpful"), limit, "helpful") \
      if pc.red_team_fraction < 1 else []
  if not red and not helpful:
    raise InputError("ppo: no prompts left (config.data and ppo.max_prompt_tokens); "
                     "give prompts that fit the context")
  # GRPO / RLOO: each prompt is sampled group_size times, in consecutive rows.
  group = 1 if critic else int(pc.group_size)
  mix = prompt_mix.PromptMix(red, helpful, pc.red_team_fraction, int(pc.batch_size) // group,
                             ctx.seed)
  P = min(bucket_length(max(len(p["ids"]) for p in red + helpful)), limit)
  pad_id = pcfg.pad_token_id if pcfg.pad_token_id is not None else 0
  ctx.begin(settings(config, workdir))
  if ai_reward:
    base = baselines(ctx, pcfg, lora.base(pparams), tok, red + helpful)
    reward_fn = rollout_lib.AIReward(_feedback_labeller(ctx, config, mesh), tok, eos, stops,
                                     base, ctx.seed)

  matcher = from_strings(tok, stops, pcfg.vocab_size)
  # The update trains the scanned layout where fitting a slice needs it; a resumed
  # run keeps the layout its checkpoints were saved in.
  scan = fit_lib.train_layout(pcfg, mesh, int(pc.get("train_top_layers", -1)),
                              ctx.path("checkpoints"))
  trainer = trainer_lib.PPOTrainer(pc, policy_cfg=pcfg, policy_params=pparams, value_cfg=vcfg,
                                   value_params=vparams, reward_fn=reward_fn, mesh=mesh,
                                   eos_ids=eos, stop_seqs=matcher, rules=rules,
                                   hbm_gib=float(config.get("hbm_gib", 0.0)),
                                   ref_dtype=ctx.frozen_dtype or "", scan_layers=scan)
  del pparams, vparams  # host copies; the trainer holds sharded ones
  pm_params = None
  state = trainer.init_state()
  # What the stage holds: the train state, the frozen reference and the reward's model.
  reward_model = rollout_lib.reward_model_params(reward_fn)
  resident = {"train_state": state_lib.tree_bytes(state),
              "reference": state_lib.tree_bytes(trainer.rollout.ref_params),
              "reward_model": state_lib.tree_bytes(reward_model)}
  if online:  # the refreshed PM's optimizer moments (its params are the reward's)
    resident["online_pm_optimizer"] = state_lib.tree_bytes(refresher.state.opt_state)
  rng = jax.random.PRNGKey(ctx.seed)

  mngr = ctx.checkpoint_manager(keep=int(pc.keep_checkpoints), async_save=False)
  if ctx.is_main:
    fit_lib.record_layout(ctx.path("checkpoints"), scan)
  start = 0
  latest = mngr.latest_step()
  if latest is not None:
    if online:
      saved, data = mngr.restore(latest, target=dict(state, online_pm=refresher.state))
      refresher.state = saved.pop("online_pm")
      refresher.load_state_dict(data["online"])
      online_lib.point_reward(reward_fn, refresher.params)
      state = saved
    else:
      state, data = mngr.restore(latest, target=state)
    trainer.load_controller_state(data["controller"])
    mix.load_state_dict(data["prompts"])
    rng = jax.numpy.asarray(np.asarray(data["rng"], np.uint32))
    start = int(data["iteration"])
    logging.info("ppo: resumed from iteration %d", start)
  metrics = ctx.metrics(tensorboard=bool(pc.tensorboard), resume_step=start, key="iteration")
  samples = ctx.metrics("samples.jsonl", tensorboard=False, resume_step=start, key="iteration")
  total = int(pc.num_iterations)
  bar = tqdm(total=total, initial=start, desc="ppo", disable=not pc.progress,
             dynamic_ncols=True)
  last = {}
  try:
    for it in range(start + 1, total + 1):
      batch = [p for p in mix.next_batch() for _ in range(group)]
      toks, mask = prompt_mix.left_pad([p["ids"] for p in batch], P, pad_id)
      rng, key = jax.random.split(rng)
      if isinstance(reward_fn, rollout_lib.AIReward):
        reward_fn.step = it
      state, m, tr = trainer.iteration(state, toks, mask, key,
                                       prompts=[p["messages"] for p in batch])
      texts = _sample_texts(reward_fn, tok, tr, eos, stops)
      if online and refresher.due(it, total):
        m.update(refresher.refresh(it, pcfg, lora.merge(trainer.unrolled(state["policy"])),
                                   tok))
        online_lib.point_reward(reward_fn, refresher.params)
      metrics.write(it, m)
      _log_samples(samples, metrics, batch, tr, texts, it, pc)
      bar.set_postfix(reward=f"{m['reward']:.3f}", kl=f"{m['kl']:.2f}", beta=f"{m['beta']:.3g}")
      bar.update(1)
      last = m
      signum = interrupts.requested(collective=True)
      if it % int(pc.checkpoint_every) == 0 or it == total or signum is not None:
        metrics.flush()
        samples.flush()
        extra = {"online": refresher.state_dict()} if online else {}
        mngr.save(it, dict(state, online_pm=refresher.state) if online else state,
                  {"iteration": it, "controller": trainer.controller_state(),
                   "prompts": mix.state_dict(), **extra,
                   "rng": np.asarray(jax.device_get(rng)).tolist()}, force=True)
      if signum is not None and it < total:
        raise interrupts.Interrupted(signum, f"ppo at iteration {it}")
  finally:
    bar.close()
    metrics.close()
    samples.close()
    mngr.close()

  policy = trainer.unrolled(state["policy"])
  ctx.export(pcfg, lora.merge(policy), tok)
  if lora.KEY in policy:  # also the adapters alone, for PEFT on the base
    ctx.export_adapter(pcfg, policy, policy_spec)
  if critic:
    ctx.export(vcfg, lora.merge(trainer.unrolled(state["value"], value=True)), tok, "value_final")
  if online:  # the PM as the last refresh left it, loadable wherever a PM is
    ctx.export(pm_cfg, refresher.params, tok, "pm_final")
  rows = list(utils.read_jsonl(ctx.path("metrics.jsonl"))) if utils.exists(
      ctx.path("metrics.jsonl")) else []
  if ctx.is_main:
    plot_curves(ctx.path("metrics.jsonl"), ctx.path("curves.png"))
    if trainer.fit is not None:  # how the update was fitted to device memory
      utils.write_json(ctx.path("memory_fit.json"), dict(trainer.fit.record(), scan_layers=scan))
  summary = {
      "algorithm": str(pc.algorithm),
      "reward": "custom" if reward_fn is not None and not isinstance(
          reward_fn, (rollout_lib.PMReward, rollout_lib.AIReward)) else str(pc.reward),
      "iterations": total,
      "reward_first": rows[0]["reward"] if rows else None,
      "reward_last": rows[-1]["reward"] if rows else None,
      "kl_last": rows[-1]["kl"] if rows else None,
      "kl_k3_last": rows[-1]["kl_k3"] if rows else None,
      "beta_last": last.get("beta", trainer.kl_ctl.beta),
      "resident_gib": {k: v / 2**30 for k, v in resident.items()},
      # Mean seconds per iteration (the first one includes compilation).
      "time_split": {k[len("time/"):]: float(np.mean([r[k] for r in rows]))
                     for k in ("time/generate", "time/reward", "time/forward", "time/train",
                               "time/iteration") if rows and all(k in r for r in rows)},
  }
  if online:
    refreshes = [r for r in rows if "online/refresh" in r]
    summary["online"] = {
        "refreshes": len(refreshes),
        "labels": sum(int(r["online/new_labels"]) for r in refreshes),
        # The PM's accuracy on each refresh's fresh labels, before and after training on them.
        "accuracy_before": [r.get("online/before_accuracy") for r in refreshes],
        "accuracy_after": [r.get("online/after_accuracy") for r in refreshes]}
  return ctx.finish(summary)


def _feedback_labeller(ctx, config, mesh, *args, **kwargs):
  """The feedback model, frozen, as a labeller under the run's constitution:
  the direct AI reward's and an online refresh's (`feedback.make_labeller`'s
  further arguments)."""
  fcfg, fparams, ftok = ctx.load(ctx.role_spec("feedback"), field="feedback_model",
                                 seed_offset=2)
  fcfg, fparams = models.frozen_copy(fcfg, fparams, ctx.frozen_dtype)
  const = constitution_lib.load(config.get("constitution", "harmlessness"))
  return feedback.make_labeller(ctx.fmt, config.label, fcfg, fparams, ftok, const, mesh,
                                *args, **kwargs)


def _online_pm(ctx, config, pm_cfg, pm_params, enc, mesh, rules, pm_len):
  """The refreshed PM (`rl.online.OnlinePM`): its feedback model, its prompts, the
  label stage's comparisons to replay and the PM stage's human comparisons."""
  pc = ctx.section
  if "label" not in config:
    raise InputError("config.ppo.online: refreshes label as the label stage does; the config "
                     "needs a label section (configs/demo.py has one)")
  pm = ml_collections.ConfigDict(dict(PM_DEFAULTS, **{
      k: config.pm[k] for k in PM_DEFAULTS if "pm" in config and k in config.pm}))
  batch = int(config.label.batch_size)
  labeller = _feedback_labeller(ctx, config, mesh, batch, per_axis=bool(pm_cfg.score_labels))
  label_file = ctx.stage_dir("label") + "/preferences.jsonl"
  source = pm.preferences or label_file
  ai = preferences.read_ai_preferences(source) \
      if source != "none" and utils.exists(source) else []
  human = preferences.read_human_pairs(pm.human_data, int(pm.max_human_pairs))
  if pm_cfg.score_labels:
    preferences.axis_labels(ai, human, pm_cfg.score_labels, str(pm.human_axis), source)
  oc = pc.online
  fraction = float(oc.human_fraction) if float(oc.human_fraction) >= 0 else float(
      pm.human_fraction)
  prompts = encode_prompts(config, enc, "red_team")
  return online_lib.OnlinePM(
      oc, pm_cfg=pm_cfg, pm_params=pm_params, encoder=enc, labeller=labeller,
      label_section=config.label, prompts=prompts,
      replay=preferences.encode_pairs(enc, ai, pm_len, ctx.seed),
      human=preferences.encode_pairs(enc, human, pm_len, ctx.seed), human_fraction=fraction,
      human_axis=str(pm.human_axis), max_len=pm_len, fmt=ctx.fmt, sample_batch_size=batch,
      mesh=mesh, rules=rules, seed=ctx.seed, num_iterations=int(pc.num_iterations),
      labels_path=ctx.path("online_labels.jsonl"), is_main=ctx.is_main,
      calibration_bins=int(pm.calibration_bins))


def _sample_texts(reward_fn, tok, tr, eos, stops) -> list:
  """The response texts as the reward read them."""
  if isinstance(reward_fn, (rollout_lib.PMReward, rollout_lib.AIReward)):
    return list(reward_fn.last_texts)
  return rollout_lib.response_texts(tok, {"response_tokens": tr.response_tokens_BxN,
                                          "response_mask": tr.response_mask_BxN}, eos, stops)


def _log_samples(samples, metrics, batch, tr, texts, it: int, pc) -> None:
  """Every sample to samples.jsonl with its PM score (before the KL term) and the
  score it was trained on (after normalisation and the missing-EOS penalty); a few
  to TensorBoard."""
  raw = np.asarray(jax.device_get(tr.scores_B), np.float64)
  rewards = getattr(tr, "raw_scores_B", None)
  rewards = raw if rewards is None else np.asarray(jax.device_get(rewards), np.float64)
  mask = np.asarray(jax.device_get(tr.response_mask_BxN))
  recs = [{"iteration": it, "id": p["id"], "kind": p["kind"], "prompt": p["messages"],
           "response": texts[i], "reward": float(rewards[i]), "score": float(raw[i]),
           "response_tokens": int(mask[i].sum())} for i, p in enumerate(batch)]
  if samples.log is not None:
    samples.log.append(recs)
  every = int(pc.log_samples_every)
  if every and (it % every == 0 or it == 1):
    shown = [f"**{r['kind']} {r['id']}** (reward {r['reward']:.3f})\n\n{r['response']}"
             for r in recs[:int(pc.num_logged_samples)]]
    metrics.text("samples", "\n\n---\n\n".join(shown), it)
