"""RL-CAI AI feedback: soft harmlessness labels from a feedback model.

For every red-team prompt the SL-CAI policy samples two responses. The
feedback model then reads a multiple-choice question: few-shot labelling
examples (each under an independently drawn principle), the conversation, a
principle drawn from the constitution and the options (A)/(B). Its log-probs of
" (A)" and " (B)" (scored, never sampled) give the soft label
p_a = exp(lp_a) / (exp(lp_a) + exp(lp_b)).

- Ensembling: `num_principles` principles per comparison, soft labels averaged.
- Position debiasing (`debias`, default on): both option orders are scored and
  the log-probs of each response averaged over the orders, which cancels a
  pure preference for the first or second letter exactly.
- Chain of thought (`cot`): the feedback model samples "Let's think step by
  step" reasoning after the CoT few-shot examples, the answer log-probs are read
  after it, `cot_samples` chains are averaged and p_a is clamped to `cot_clamp`
  (the paper: 0.4-0.6), because reasoning makes labels overconfident.
- `hard_labels`: ablation that rounds p_a to 0/1.

Output in WORKDIR/label/:
  preferences.jsonl  {id, prompt, response_a, response_b, principle_ids, p_a, logp_a,
                      logp_b, cot (CoT only), p_a_soft (hard labels only)}
  tfds/              the same records as an array_record TFDS dataset (data/preferences_tfds.py)
  chunks/            fixed-size chunks written under a temporary name, then renamed
  DONE               written last
Chunk i draws all its randomness from fold_in(seed, i): a killed run resumes at
the first missing chunk and ends with the output of an uninterrupted run.

Several processes (a pod slice): chunk i goes to host i % process_count
(`multihost.run_dealt`), which samples and scores it on a mesh of its own
devices and writes it into its own chunks/. The records are gathered over the
collectives (no shared disk needed); process 0 alone writes preferences.jsonl,
tfds/ and DONE, the same files as one process writes (common.generation_mesh
says when they are also bit-identical), and every host returns the same summary.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence

from absl import logging
import jax
import ml_collections
import numpy as np
import tqdm

from cai_jax import constitution as constitution_lib
from cai_jax import multihost
from cai_jax import text as text_lib
from cai_jax.data import prompts as prompts_lib
from cai_jax.evaluation import multiple_choice as mc
from cai_jax.evaluation import option_scores
from cai_jax.utils import (InputError, atomic_write_text, done_info, make_chunk_dir, mark_done,
                           read_jsonl)
from cai_jax.stages.common import check_run_signature, stage_section

STAGE = "label"
INTRO = "Consider the following conversation between a human and an assistant:"
STEP = "Let's think step by step:"
SO = "So the answer is:"
CLAMPS = {"0.4,0.6": (0.4, 0.6), "0.2,0.8": (0.2, 0.8), "none": None}


def default_config() -> ml_collections.ConfigDict:
  """The `config.label` section."""
  c = ml_collections.ConfigDict()
  # model sampling the 2 responses; "" = WORKDIR/sft/final if present, else config.model
  c.policy = ""
  c.max_new_tokens = 128  # token budget of each sampled response
  c.temperature = 1.0  # sampling temperature of the responses
  c.top_p = 1.0  # nucleus threshold of the responses (1.0 = off)
  c.num_principles = 1  # principles per comparison; k > 1 averages the k soft labels (ensembling)
  c.num_fewshot = -1  # few-shot labelling examples before each question (-1: all)
  c.debias = True  # score both option orders and average, cancelling position bias
  c.hard_labels = False  # ablation: p_a rounded to 0/1 (0.5 stays); soft value kept as p_a_soft
  c.cot = False  # chain-of-thought labels (reasoning sampled before the answer is read)
  c.cot_samples = 1  # reasoning chains per question; their probabilities are averaged
  c.cot_max_new_tokens = 128  # token budget of each chain of thought
  c.cot_temperature = 1.0  # sampling temperature of the chains
  c.cot_clamp = "0.4,0.6"  # CoT probability clamp: "0.4,0.6" (paper), "0.2,0.8" or "none"
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


def _section(config):
  return stage_section(config, STAGE, default_config())


def _top(config, key, default):
  v = config.get(key, None) if hasattr(config, "get") else None
  return default if v is None or v == "" else v


def parse_clamp(s: str):
  key = str(s).replace(" ", "").lower()
  if key not in CLAMPS:
    raise InputError(f"config.label.cot_clamp={s!r}; use one of {sorted(CLAMPS)}")
  return CLAMPS[key]


# ----------------------------------------------------------------------------
# Questions.

def question_body(conversation: Sequence[dict], principle: str, responses: Sequence[str]) -> str:
  """The conversation, the principle and the options, without the answer cue."""
  context = INTRO + text_lib.to_transcript(conversation)
  q = mc.format_question(context, principle, responses)
  return q[:-len(mc.ANSWER_CUE)].rstrip("\n")


def _letter(j: int) -> str:
  return mc.letter_option(j)


class Prompter:
  """Builds label and chain-of-thought questions, raw or through the chat template.

  Every rendered text ends exactly where the model continues: label prompts
  before " (A)"/" (B)", CoT prompts before the reasoning.
  """

  def __init__(self, fmt: str, tokenizer, system: str = "", limit: int = 0):
    if fmt not in ("raw", "chat"):
      raise InputError(f"config.prompt_format={fmt!r}; use 'chat' or 'raw'")
    self.fmt, self.tok, self.limit = fmt, tokenizer, limit
    self.system = system or None
    self.shortened = 0

  def _render(self, turns: list, last_assistant: str) -> str:
    """turns: [(user text, assistant text)] then the final assistant prefix."""
    if self.fmt == "raw":
      out = [u + "\n" + a + "\n\n\n" for u, a in turns[:-1]]
      return "".join(out) + turns[-1][0] + "\n" + last_assistant
    msgs = [] if self.system is None else [{"role": "system", "content": self.system}]
    for u, a in turns[:-1]:
      msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    msgs += [{"role": "user", "content": turns[-1][0]},
             {"role": "assistant", "content": last_assistant}]
    return text_lib.render(msgs, "chat", self.tok, continue_final=True)

  def _fit(self, build, n: int) -> str:
    """build(k) with the most few-shot examples k <= n that fits the limit."""
    for k in range(n, -1, -1):
      s = build(k)
      if not self.limit or len(self.tok(s, add_special_tokens=False)["input_ids"]) <= self.limit:
        if k < n:
          self.shortened += 1
        return s
    return s

  def label(self, shots: Sequence[tuple], conversation, principle: str, responses) -> str:
    """shots: [(conversation, principle, options, answer)]; ends before " (A)"."""
    def build(k):
      turns = [(question_body(c, p, o), f"{mc.ANSWER_CUE}{_letter(a)}")
               for c, p, o, a in shots[:k]]
      turns.append((question_body(conversation, principle, responses), None))
      return self._render(turns, mc.ANSWER_CUE)
    return self._fit(build, len(shots))

  def cot(self, shots: Sequence[tuple], conversation, principle: str, responses) -> str:
    """shots: [(conversation, principle, options, reasoning, answer)]; ends before the reasoning."""
    def build(k):
      turns = [(question_body(c, p, o), f"{STEP} {r.strip()}\n{SO}{_letter(a)}")
               for c, p, o, r, a in shots[:k]]
      turns.append((question_body(conversation, principle, responses), None))
      return self._render(turns, STEP)
    return self._fit(build, len(shots))

  @staticmethod
  def cot_answer(cot_prompt: str, reasoning: str) -> str:
    """The CoT prompt with its reasoning, ending before " (A)"."""
    return f"{cot_prompt} {reasoning.strip()}\n{SO}"


def clean_reasoning(s: str) -> str:
  """Reasoning up to the model's own answer (which is read by scoring instead)."""
  for cut in ("So the answer is", "The answer is"):
    k = s.find(cut)
    if k >= 0:
      s = s[:k]
  return s.strip()


# ----------------------------------------------------------------------------
# Labelling.

def pair_logprobs(lps_per_order: Sequence[np.ndarray], swapped: Sequence[bool]):
  """(logp_a, logp_b): each response's option log-prob averaged over the orders.

  An order that is `swapped` shows response b as (A). With a pure position
  bias (lp = content + bias[position]) both responses gain the same mean bias,
  so p_a = sigmoid(logp_a - logp_b) depends on content only.
  """
  la = [lp[1] if s else lp[0] for lp, s in zip(lps_per_order, swapped)]
  lb = [lp[0] if s else lp[1] for lp, s in zip(lps_per_order, swapped)]
  return float(np.mean(la)), float(np.mean(lb))


def soft_label(logp_a: float, logp_b: float) -> float:
  """exp(lp_a) / (exp(lp_a) + exp(lp_b)), computed stably."""
  d = logp_a - logp_b
  return float(1.0 / (1.0 + np.exp(-d))) if d >= 0 else float(np.exp(d) / (1.0 + np.exp(d)))


class Labeller:
  """Turns (conversation, response_a, response_b) into labels with the feedback model."""

  def __init__(self, cfg, params, tokenizer, prompter: Prompter, const, lc, mesh=None,
               batch_size=None):
    self.cfg, self.params, self.tok, self.prompter, self.lc = cfg, params, tokenizer, prompter, lc
    self.principles = list(const.choice_principles)
    if not self.principles:
      raise InputError(f"{const.source or const.name}: the constitution has no choice_principles; "
                       "add the multiple-choice questions used for labelling")
    for p in self.principles:
      if not str(p.text).strip():
        raise InputError(f"{const.source or const.name}: choice principle {p.id!r} is empty; "
                         "give its question text")
    nf, nc = int(lc.num_fewshot), int(lc.num_cot_fewshot)
    self.label_examples = list(const.label_examples if nf < 0 else const.label_examples[:nf])
    self.cot_examples = list(const.cot_examples if nc < 0 else const.cot_examples[:nc])
    self.clamp = parse_clamp(lc.cot_clamp)
    self.mesh = mesh
    self.batch_size = int(lc.batch_size if batch_size is None else batch_size)
    self.options = [tokenizer(_letter(j), add_special_tokens=False)["input_ids"] for j in (0, 1)]
    self.pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    self.first_position = []  # P((A)) of every scored question: the raw position preference

  def _example_principle(self, ex_principle: str, rng) -> str:
    # "" means "ask the principle being asked"; here each example gets its own draw.
    return ex_principle or self.principles[rng.integers(len(self.principles))].text

  def _questions(self, items, rng):
    """One entry per (item, principle, order): (item index, principle id, swapped, text)."""
    out = []
    orders = (False, True) if self.lc.debias else (False,)
    for i, it in enumerate(items):
      for _ in range(int(self.lc.num_principles)):
        p = self.principles[rng.integers(len(self.principles))]
        if self.lc.cot:
          shots = [(ex.conversation, self._example_principle(ex.principle, rng), ex.options,
                    ex.reasoning, ex.answer) for ex in self.cot_examples]
        else:
          shots = [(ex.conversation, self._example_principle(ex.principle, rng), ex.options,
                    ex.answer) for ex in self.label_examples]
        for swapped in orders:
          resp = ((it["response_b"], it["response_a"]) if swapped
                  else (it["response_a"], it["response_b"]))
          build = self.prompter.cot if self.lc.cot else self.prompter.label
          out.append((i, p.id, swapped, build(shots, it["prompt"], p.text, resp)))
    return out

  def _score(self, texts: Sequence[str]) -> list:
    from cai_jax import sampling
    ids = [sampling.encode_prompt(self.tok, t) for t in texts]
    lps = option_scores.option_logprobs(self.cfg, self.params, ids, [self.options] * len(ids),
                                        max_tokens=int(self.lc.score_tokens), pad_id=self.pad)
    for lp in lps:
      self.first_position.append(soft_label(lp[0], lp[1]))
    return lps

  def __call__(self, items: Sequence[dict], rng: np.random.Generator, seed: int) -> list:
    """items: {prompt (messages), response_a, response_b}; returns label fields per item."""
    qs = self._questions(items, rng)
    K = int(self.lc.cot_samples) if self.lc.cot else 1
    if self.lc.cot:
      from cai_jax import sampling
      stops = text_lib.stop_strings(self.prompter.fmt, self.tok) + ["So the answer is",
                                                                    "\n\n\n"]
      comps = sampling.generate(
          self.cfg, self.params, self.tok, [q[3] for q in qs for _ in range(K)],
          fmt=self.prompter.fmt, max_new_tokens=int(self.lc.cot_max_new_tokens),
          temperature=float(self.lc.cot_temperature), stop=stops, seed=seed,
          batch_size=self.batch_size, mesh=self.mesh, progress=False,
          truncate_long_prompts=True, desc="chain of thought")
      chains = [clean_reasoning(c.text) for c in comps]
      lps = self._score([Prompter.cot_answer(qs[j // K][3], chains[j]) for j in range(len(chains))])
    else:
      chains, lps = [], self._score([q[3] for q in qs])
    # Group: item -> principle draw -> chain -> orders.
    per_item = [dict() for _ in items]
    for j, lp in enumerate(lps):
      qi = j // K
      i, pid, swapped, _ = qs[qi]
      per_draw = per_item[i]
      # Orders of one draw are consecutive; the draw index is the position of its first order.
      draw = qi - (1 if swapped else 0)
      per_draw.setdefault(draw, {"pid": pid, "chains": [[] for _ in range(K)]})
      per_draw[draw]["chains"][j % K].append((lp, swapped))
    out = []
    for i, draws in enumerate(per_item):
      ps, las, lbs = [], [], []
      for d in sorted(draws):
        chain_ps = []
        for chain in draws[d]["chains"]:
          la, lb = pair_logprobs([c[0] for c in chain], [c[1] for c in chain])
          chain_ps.append(soft_label(la, lb))
          las.append(la)
          lbs.append(lb)
        ps.append(float(np.mean(chain_ps)))
      p = float(np.mean(ps))
      if self.lc.cot and self.clamp is not None:
        p = float(np.clip(p, *self.clamp))
      rec = {"principle_ids": [draws[d]["pid"] for d in sorted(draws)], "p_a": p,
             "logp_a": float(np.mean(las)), "logp_b": float(np.mean(lbs))}
      if self.lc.cot:
        rec["cot"] = [chains[j] for j in range(len(chains)) if qs[j // K][0] == i]
      if self.lc.hard_labels:
        rec["p_a_soft"] = p
        rec["p_a"] = 1.0 if p > 0.5 else 0.0 if p < 0.5 else 0.5
      out.append(rec)
    return out


# ----------------------------------------------------------------------------
# The stage.

def _seed(key) -> int:
  return int(jax.random.randint(key, (), 0, 2**31 - 1))


def _chunk_path(stage_dir: str, i: int) -> str:
  return os.path.join(stage_dir, "chunks", f"preferences-{i:05d}.jsonl")


def _jsonl(records) -> str:
  return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def _read_chunk(path: str, ids: list) -> Optional[list]:
  if not os.path.exists(path):
    return None
  recs = list(read_jsonl(path))
  if [r.get("id") for r in recs] != ids:
    raise InputError(f"{path}: finished chunk holds other prompts than this run would put "
                     "there (prompt set or chunk_size changed); use a fresh --workdir")
  return recs


def policy_path(config, workdir: str, lc=None) -> str:
  """label.policy if set, else the SL-CAI export WORKDIR/sft/final, else config.model."""
  lc = _section(config) if lc is None else lc
  if str(lc.policy):
    return str(lc.policy)
  sft = os.path.join(workdir, "sft", "final")
  if os.path.isdir(sft):
    return sft
  return str(_top(config, "model", "tiny"))


def _check_signature(stage_dir: str, sig: dict) -> None:
  # Fields that do not change what a chunk holds may differ between attempts.
  check_run_signature(stage_dir, sig, STAGE,
                      volatile=("batch_size", "progress", "write_tfds", "score_tokens"))


def run(config, workdir: str) -> dict:
  """Runs (or resumes) the label stage into WORKDIR/label; returns summary numbers."""
  from cai_jax import sampling
  from cai_jax.stages import common
  stage_dir = os.path.join(workdir, STAGE)
  lc = _section(config)
  # Only process 0 writes DONE; the other hosts may not share its disk.
  done = multihost.from_main(done_info(stage_dir))
  if done is not None:
    logging.info("label: %s has DONE; skipping", stage_dir)
    return done
  for k in ("chunk_size", "batch_size", "num_principles", "cot_samples", "score_tokens"):
    if int(lc[k]) < 1:
      raise InputError(f"config.label.{k}={lc[k]}: must be >= 1")
  parse_clamp(lc.cot_clamp)
  fmt = str(_top(config, "prompt_format", "chat"))
  const = constitution_lib.load(_top(config, "constitution", "harmlessness"))
  red = prompts_lib.load_prompts(_top(config, "data", None), "red_team", str(lc.split))
  if not red:
    raise InputError("label: no red-team prompts in this split; check config.data")
  seed = int(_top(config, "seed", 0))
  dtype = _top(config, "dtype", None)
  pol_path = policy_path(config, workdir, lc)
  fb_path = str(_top(config, "feedback_model", _top(config, "model", "tiny")))
  make_chunk_dir(os.path.join(stage_dir, "chunks"))
  sig = {
      "seed": seed, "policy": pol_path, "feedback_model": fb_path, "dtype": str(dtype or ""),
      "prompt_format": fmt, "constitution": const.name,
      "choice_principles": const.choice_principle_ids, "label": lc.to_dict(),
      "red_team_ids": [p["id"] for p in red]}
  multihost.check_same(sig, "label run signature (config, prompts, models)")
  _check_signature(stage_dir, sig)

  mesh, batch_size = common.generation_mesh(config, int(lc.batch_size))
  pcfg, pparams, ptok = common.load_model(pol_path, seed=seed, dtype=dtype)
  if fb_path == pol_path:
    fcfg, fparams, ftok = pcfg, pparams, ptok
  else:
    fcfg, fparams, ftok = common.load_model(fb_path, seed=seed, dtype=dtype)
  margin = 16 + (int(lc.cot_max_new_tokens) if lc.cot else 0)
  limit = fcfg.max_position_embeddings - margin
  if int(lc.max_prompt_tokens) > 0:
    limit = min(limit, int(lc.max_prompt_tokens))
  prompter = Prompter(fmt, ftok, str(lc.system_prompt), limit)
  labeller = Labeller(fcfg, fparams, ftok, prompter, const, lc, mesh, batch_size)

  root = jax.random.PRNGKey(seed)
  cs = int(lc.chunk_size)
  num_chunks = -(-len(red) // cs)
  mine = multihost.host_jobs(num_chunks)
  bar = tqdm.tqdm(total=sum(len(red[i * cs:(i + 1) * cs]) for i in mine), unit="prompt",
                  desc="label", disable=not lc.progress)

  def one_chunk(i: int) -> dict:
    items = red[i * cs:(i + 1) * cs]
    path = _chunk_path(stage_dir, i)
    recs = _read_chunk(path, [it["id"] for it in items])
    resumed, shortened = recs is not None, prompter.shortened
    first = len(labeller.first_position)
    if recs is None:
      key = jax.random.fold_in(root, i)
      k_resp, k_label, k_rng = jax.random.split(key, 3)
      msgs = [it["messages"] for it in items]
      comps = sampling.generate(
          pcfg, pparams, ptok, [m for m in msgs for _ in range(2)], fmt=fmt,
          max_new_tokens=int(lc.max_new_tokens), temperature=float(lc.temperature),
          top_p=float(lc.top_p), seed=_seed(k_resp), batch_size=batch_size,
          mesh=mesh, progress=False, truncate_long_prompts=True, desc="responses")
      pairs = [{"id": it["id"], "prompt": it["messages"],
                "response_a": comps[2 * j].text.strip(),
                "response_b": comps[2 * j + 1].text.strip()} for j, it in enumerate(items)]
      labels = labeller(pairs, np.random.default_rng(_seed(k_rng)), _seed(k_label))
      recs = [dict(p, **lab) for p, lab in zip(pairs, labels)]
      atomic_write_text(path, _jsonl(recs))
    bar.update(len(items))
    return {"records": recs, "resumed": resumed, "shortened": prompter.shortened - shortened,
            "first_position": labeller.first_position[first:]}

  # Every chunk once, in chunk order, on every host (one process: this loop alone).
  results = multihost.run_dealt(num_chunks, one_chunk)
  bar.close()
  done = [rec for r in results for rec in r["records"]]
  resumed = sum(len(r["records"]) for r in results if r["resumed"])
  # In chunk order, as one process appends them, so the mean is the same number.
  first_position = [x for r in results for x in r["first_position"]]

  out_path = os.path.join(stage_dir, "preferences.jsonl")
  if multihost.is_main():
    atomic_write_text(out_path, _jsonl(done))
    if lc.write_tfds:
      from cai_jax.data import preferences_tfds
      preferences_tfds.build(out_path, os.path.join(stage_dir, "tfds"))
  p = np.array([r["p_a"] for r in done])
  summary = {
      "num_comparisons": len(done), "resumed_prompts": resumed,
      "mean_p_a": float(p.mean()), "frac_a_preferred": float(np.mean(p > 0.5)),
      "mean_confidence": float(np.mean(np.abs(p - 0.5)) + 0.5),
      "frac_identical_pairs": float(np.mean([r["response_a"] == r["response_b"] for r in done])),
      "questions_shortened": sum(r["shortened"] for r in results),
      "policy": pol_path, "feedback_model": fb_path,
  }
  if first_position:
    # P((A)) averaged over every scored question: 0.5 means no raw position preference.
    summary["mean_p_first_option"] = float(np.mean(first_position))
  if multihost.is_main():
    mark_done(stage_dir, summary)
  multihost.sync("label: DONE written")
  return summary
