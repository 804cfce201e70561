"""RL-CAI AI feedback: soft harmlessness labels from a feedback model.

For every red-team prompt the SL-CAI policy samples two responses; the
feedback model judges each pair in a multiple-choice question under a sampled
principle (`cai_jax.feedback`: few-shot examples, ensembling, position
debiasing, chain of thought with its clamp, hard-label ablation).

Output in WORKDIR/label/:
  preferences.jsonl  {id, prompt, response_a, response_b, principle_ids, p_a, logp_a,
                      logp_b, cot (CoT only), p_a_soft (hard labels only),
                      axes (per_axis only: {axis: those label fields})}
  tfds/              the same records as an array_record TFDS dataset (data/preferences_tfds.py)
  chunks/            fixed-size chunks written under a temporary name, then renamed
  DONE               written last
Chunk i draws all its randomness from fold_in(seed, i); chunks, resumption and
several processes are the generation runner's (`runtime.runners.run_chunks`).
"""
from __future__ import annotations

import jax
import ml_collections
import numpy as np

from cai_jax import constitution as constitution_lib
from cai_jax import feedback, models, sampling
from cai_jax.data import prompts as prompts_lib
from cai_jax.runtime import StageContext, runners, stage_settings
from cai_jax.utils import InputError

STAGE = "label"
USES = ("seed", "model", "feedback_model", "dtype", "frozen_dtype", "prompt_format",
        "constitution", "data")
# Fields that do not change what a chunk holds.
VOLATILE = ("batch_size", "progress", "write_tfds", "score_tokens")


def default_config() -> ml_collections.ConfigDict:
  """The `config.label` section."""
  c = ml_collections.ConfigDict()
  # model sampling the 2 responses; "" = WORKDIR/sft when the sft stage is part of the run
  # or has run, else config.model (any form of cai_jax.roles)
  c.policy = ""
  c.max_new_tokens = 128  # token budget of each sampled response
  c.temperature = 1.0  # sampling temperature of the responses
  c.top_p = 1.0  # nucleus threshold of the responses (1.0 = off)
  c.num_principles = 1  # principles per comparison; k > 1 averages the k soft labels (ensembling)
  # one soft label per axis of the constitution (its "axes"), num_principles drawn within
  # each; the record's p_a is their mean, `axes` holds each
  c.per_axis = False
  c.num_fewshot = -1  # few-shot labelling examples before each question (-1: all)
  c.options_header = True  # an "Options:" line before (A)/(B), as in the paper's prompt
  c.debias = True  # score both option orders and combine them, cancelling position bias
  # how the two orders combine: "probability" (mean of the two P(a better)) or "logprob"
  # (label of the mean log-probs: cancels a pure letter bias exactly, but one confident
  # order dominates)
  c.debias_mean = "probability"
  c.hard_labels = False  # ablation: p_a rounded to 0/1 (0.5 stays); soft value kept as p_a_soft
  c.cot = False  # chain-of-thought labels (reasoning sampled before the answer is read)
  c.cot_samples = 1  # reasoning chains per question; their probabilities are averaged
  c.cot_max_new_tokens = 128  # token budget of each chain of thought
  c.cot_temperature = 1.0  # sampling temperature of the chains
  c.cot_clamp = (0.4, 0.6)  # CoT probability clamp (paper: 40-60%); () = none
  c.cot_dialogue = True  # raw format: CoT questions as Human:/Assistant: turns (paper)
  c.num_cot_fewshot = -1  # CoT few-shot examples before each question (-1: all)
  c.split = "train"  # red-team prompt split to label ("train" | "eval" | "all")
  c.batch_size = 16  # sampler batch size
  c.score_tokens = 4096  # padded prompt tokens per scoring call (memory bound)
  c.chunk_size = 32  # prompts per output chunk; the unit of resumption (keep fixed within a run)
  c.max_prompt_tokens = 0  # longest question; 0 = the feedback model's context minus a margin
  c.system_prompt = ""  # system message for chat rendering ("" = the template's default)
  c.write_tfds = True  # also write the records as an array_record TFDS dataset
  c.progress = True  # show a prompts/s progress bar
  return c


def settings(config, workdir: str) -> dict:
  """What this stage's records depend on (its provenance snapshot)."""
  const = constitution_lib.load(config.get("constitution", "harmlessness"))
  extra = {"constitution_sha": const.fingerprint()}
  if config.label.get("per_axis", False):
    # Named to sort after the config fields: a refused resume names the field first.
    extra["sha_of_constitution_axes"] = const.axes_fingerprint()
  return stage_settings(config, workdir, STAGE, USES, VOLATILE, extra)


def run(config, workdir: str) -> dict:
  """Runs (or resumes) the label stage into WORKDIR/label; returns summary numbers."""
  ctx = StageContext(config, workdir, STAGE, default_config())
  lc = ctx.section
  done = ctx.done()
  if done is not None:
    return done
  feedback.parse_clamp(lc.cot_clamp)
  const = constitution_lib.load(config.get("constitution", "harmlessness"))
  red = prompts_lib.load_prompts(config.get("data", None), "red_team", str(lc.split))
  if not red:
    raise InputError("label: no red-team prompts in this split; check config.data")
  pol_path = ctx.role_spec("policy", str(lc.policy))
  fb_path = ctx.role_spec("feedback")
  runners.prepare_chunks(ctx)
  mesh, batch_size = sampling.generation_mesh(config, int(lc.batch_size))
  pcfg, pparams, ptok = ctx.load(pol_path, field="label.policy")
  if fb_path == pol_path:
    fcfg, fparams, ftok = pcfg, pparams, ptok
  else:
    fcfg, fparams, ftok = ctx.load(fb_path, field="feedback_model")
  fcfg, fparams = models.frozen_copy(fcfg, fparams, ctx.frozen_dtype)
  labeller = feedback.make_labeller(ctx.fmt, lc, fcfg, fparams, ftok, const, mesh, batch_size,
                                    per_axis=bool(lc.per_axis))
  ctx.begin(settings(config, workdir))

  root = jax.random.PRNGKey(ctx.seed)
  chunks = runners.chunk_list("preferences", red, lc.chunk_size)

  def make(chunk):
    shortened, first = labeller.prompter.shortened, len(labeller.first_position)
    recs = feedback.sample_and_label(pcfg, pparams, ptok, ctx.fmt, labeller, chunk.items, lc,
                                     jax.random.fold_in(root, chunk.index), batch_size, mesh)
    return recs, {"shortened": labeller.prompter.shortened - shortened,
                  "first_position": labeller.first_position[first:]}

  results = runners.run_chunks(ctx, chunks, make, desc="label", progress=bool(lc.progress))
  done = [rec for r in results for rec in r.records]
  resumed = sum(len(r.records) for r in results if r.resumed)
  # In chunk order, as one process appends them, so the mean is the same number.
  first_position = [x for r in results if r.extra for x in r.extra["first_position"]]

  ctx.write_jsonl("preferences.jsonl", done, once=True)
  if lc.write_tfds and ctx.is_main:
    from cai_jax.data import preferences_tfds
    preferences_tfds.build(ctx.path("preferences.jsonl"), ctx.path("tfds"))
  p = np.array([r["p_a"] for r in done])
  summary = {
      "num_comparisons": len(done), "resumed_prompts": resumed,
      "mean_p_a": float(p.mean()), "frac_a_preferred": float(np.mean(p > 0.5)),
      "mean_confidence": float(np.mean(np.abs(p - 0.5)) + 0.5),
      "frac_identical_pairs": float(np.mean([r["response_a"] == r["response_b"] for r in done])),
      "questions_shortened": sum(r.extra["shortened"] for r in results if r.extra),
      "policy": pol_path, "feedback_model": fb_path,
  }
  if lc.per_axis:
    summary["mean_p_a_per_axis"] = {a: float(np.mean([r["axes"][a]["p_a"] for r in done]))
                                    for a in const.axis_names}
  if first_position:
    # P((A)) averaged over every scored question: 0.5 means no raw position preference.
    summary["mean_p_first_option"] = float(np.mean(first_position))
  return ctx.finish(summary)
