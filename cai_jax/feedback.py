"""The feedback model's multiple-choice judgement of two responses (RL-CAI's AI labels).

The feedback model reads few-shot labelling examples (each under an
independently drawn principle), the conversation, a principle drawn from the
constitution and the options (A)/(B). Its log-probs of " (A)" and " (B)"
(scored, never sampled) give the soft label p_a = exp(lp_a) / (exp(lp_a) +
exp(lp_b)).

- Ensembling: `num_principles` principles per comparison, soft labels averaged.
- Position debiasing (`debias`): both option orders are scored and combined,
  either as the mean of the two orders' probabilities (`debias_mean=
  "probability"`) or of each response's log-prob (`"logprob"`, which cancels a
  pure letter bias exactly but lets one confident order dominate: 0.99 and 0.40
  give 0.89 where the probability mean is 0.695).
- Chain of thought (`cot`): "Let's think step by step" reasoning is sampled after
  the CoT few-shot examples, the answer log-probs are read after it, `cot_samples`
  chains are averaged and p_a is clamped to `cot_clamp` (the paper: 0.4-0.6).
- `hard_labels`: ablation that rounds p_a to 0/1.

Used by the label stage, by the evaluate stage's feedback-model judge and by any
RL variant that reads the feedback model directly.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from cai_jax import text as text_lib
from cai_jax.evaluation import multiple_choice as mc
from cai_jax.evaluation import option_scores
from cai_jax.text import conversation
from cai_jax.utils import InputError

INTRO = "Consider the following conversation between a human and an assistant:"
STEP = "Let's think step by step:"
SO = "So the answer is:"
_NAMED_CLAMPS = {"0.4,0.6": (0.4, 0.6), "0.2,0.8": (0.2, 0.8), "none": None, "": None}


def parse_clamp(value):
  """config.label.cot_clamp -> (low, high) or None: a pair, () for none, or a
  legacy string ("0.4,0.6", "none")."""
  if isinstance(value, str):
    key = value.replace(" ", "").lower()
    if key not in _NAMED_CLAMPS:
      raise InputError(f"config.label.cot_clamp={value!r}; use a pair such as (0.4, 0.6) or ()")
    return _NAMED_CLAMPS[key]
  v = tuple(value or ())
  if not v:
    return None
  try:
    lo, hi = (float(x) for x in v)
  except (TypeError, ValueError):
    raise InputError(f"config.label.cot_clamp={value!r}; use a pair such as (0.4, 0.6) "
                     "or () for none") from None
  if not 0.0 <= lo < hi <= 1.0:
    raise InputError(f"config.label.cot_clamp={value!r}: need 0 <= low < high <= 1")
  return lo, hi


def question_body(conv: Sequence[dict], principle: str, responses: Sequence[str],
                  options_header: bool = True) -> str:
  """The conversation, the principle and the options, without the answer cue."""
  context = INTRO + text_lib.to_transcript(conv)
  q = mc.format_question(context, principle, responses, options_header=options_header)
  return q[:-len(mc.ANSWER_CUE)].rstrip("\n")


def _letter(j: int) -> str:
  return mc.letter_option(j)


class Prompter:
  """Builds label and chain-of-thought questions, raw or through the chat template.

  Every rendered text ends exactly where the model continues: label prompts
  before " (A)"/" (B)", CoT prompts before the reasoning. In raw format the
  questions are plain text (the paper's labelling prompt); `raw_cot_dialogue`
  wraps chain-of-thought questions in Human:/Assistant: turns, as the paper's
  CoT prompt does.
  """

  def __init__(self, fmt: str, tokenizer, system: str = "", limit: int = 0,
               options_header: bool = True, raw_cot_dialogue: bool = True):
    if fmt not in ("raw", "chat"):
      raise InputError(f"config.prompt_format={fmt!r}; use 'chat' or 'raw'")
    self.fmt, self.tok, self.limit = fmt, tokenizer, limit
    self.system = system or None
    self.options_header, self.raw_cot_dialogue = bool(options_header), bool(raw_cot_dialogue)
    self.shortened = 0

  def _render(self, turns: list, last_assistant: str, dialogue: bool = False) -> str:
    """turns: [(user text, assistant text)] then the final assistant prefix."""
    if self.fmt == "raw":
      if dialogue:
        msgs = []
        for u, a in turns[:-1]:
          msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
        msgs += [{"role": "user", "content": turns[-1][0]},
                 {"role": "assistant", "content": last_assistant}]
        return text_lib.to_transcript(msgs).lstrip("\n")
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

  def _body(self, c, p, o) -> str:
    return question_body(c, p, o, self.options_header)

  def label(self, shots: Sequence[tuple], conv, principle: str, responses) -> str:
    """shots: [(conversation, principle, options, answer)]; ends before " (A)"."""
    def build(k):
      turns = [(self._body(c, p, o), f"{mc.ANSWER_CUE}{_letter(a)}") for c, p, o, a in shots[:k]]
      turns.append((self._body(conv, principle, responses), None))
      return self._render(turns, mc.ANSWER_CUE)
    return self._fit(build, len(shots))

  def cot(self, shots: Sequence[tuple], conv, principle: str, responses) -> str:
    """shots: [(conversation, principle, options, reasoning, answer)]; ends before the reasoning."""
    def build(k):
      turns = [(self._body(c, p, o), f"{STEP} {r.strip()}\n{SO}{_letter(a)}")
               for c, p, o, r, a in shots[:k]]
      turns.append((self._body(conv, principle, responses), None))
      return self._render(turns, STEP, dialogue=self.raw_cot_dialogue)
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


def debiased_label(lps_per_order: Sequence[np.ndarray], swapped: Sequence[bool],
                   mean: str = "probability") -> float:
  """p_a from one or more option orders: the mean of each order's probability that
  response a is better ("probability"), or the label of the order-averaged
  log-probs ("logprob")."""
  if mean == "logprob":
    return soft_label(*pair_logprobs(lps_per_order, swapped))
  if mean != "probability":
    raise InputError(f"config.label.debias_mean={mean!r}; use 'probability' or 'logprob'")
  ps = [soft_label(lp[1], lp[0]) if s else soft_label(lp[0], lp[1])
        for lp, s in zip(lps_per_order, swapped)]
  return float(np.mean(ps))


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
    self.debias_mean = str(lc.get("debias_mean", "probability"))
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
    ids = [self._fit_context(conversation.encode_text(self.tok, t)) for t in texts]
    lps = option_scores.option_logprobs(self.cfg, self.params, ids, [self.options] * len(ids),
                                        max_tokens=int(self.lc.score_tokens), pad_id=self.pad)
    for lp in lps:
      self.first_position.append(soft_label(lp[0], lp[1]))
    return lps

  def _fit_context(self, ids: list) -> list:
    """A question the few-shot cuts could not fit (a prompt longer than the context)
    keeps its end, where the options and the answer cue are (its BOS stays in front);
    counted in `prompter.shortened`."""
    limit = self.prompter.limit or self.cfg.max_position_embeddings - 16
    if len(ids) > limit:
      self.prompter.shortened += 1
    return conversation.keep_end(self.tok, ids, limit)

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
          lps_c, sw_c = [c[0] for c in chain], [c[1] for c in chain]
          la, lb = pair_logprobs(lps_c, sw_c)
          chain_ps.append(debiased_label(lps_c, sw_c, self.debias_mean))
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


class AxisLabeller:
  """One label per axis of the constitution: each axis's Labeller draws its
  principles within the axis. The record's `axes` holds every axis's label fields;
  its own p_a, logp_a and logp_b are the axes' means (what a single-scalar PM reads),
  and principle_ids lists every axis's draws."""

  def __init__(self, labellers: dict):
    self.labellers = labellers
    first = next(iter(labellers.values()))
    # One prompter (its count of shortened questions) and one list of first-option
    # probabilities for all axes, as for a single Labeller.
    self.prompter, self.params, self.cfg = first.prompter, first.params, first.cfg
    self.first_position = first.first_position
    for lab in labellers.values():
      lab.first_position = self.first_position

  def __call__(self, items: Sequence[dict], rng: np.random.Generator, seed: int) -> list:
    per_axis = {name: lab(items, rng, seed + k)
                for k, (name, lab) in enumerate(self.labellers.items())}
    out = []
    for i in range(len(items)):
      axes = {name: recs[i] for name, recs in per_axis.items()}
      rec = {"principle_ids": [pid for r in axes.values() for pid in r["principle_ids"]]}
      for key in ("p_a", "logp_a", "logp_b", "p_a_soft"):
        if key in next(iter(axes.values())):
          rec[key] = float(np.mean([r[key] for r in axes.values()]))
      rec["axes"] = axes
      out.append(rec)
    return out


def make_labeller(fmt: str, lc, cfg, params, tokenizer, const, mesh=None, batch_size=None,
                  per_axis: bool = False):
  """The feedback model's Labeller with a label section's prompt settings (the
  label stage's, or the evaluate stage's feedback-model judge); `per_axis`: an
  AxisLabeller over the constitution's axes."""
  margin = 16 + (int(lc.cot_max_new_tokens) if lc.cot else 0)
  limit = cfg.max_position_embeddings - margin
  if int(lc.max_prompt_tokens) > 0:
    limit = min(limit, int(lc.max_prompt_tokens))
  prompter = Prompter(fmt, tokenizer, str(lc.system_prompt), limit,
                      bool(lc.get("options_header", True)), bool(lc.get("cot_dialogue", True)))
  if not per_axis:
    return Labeller(cfg, params, tokenizer, prompter, const, lc, mesh, batch_size)
  if not const.axes:
    raise InputError(f"{const.source or const.name}: label.per_axis needs a constitution with "
                     "axes (an \"axes\" object, constitutions/README.md), or per_axis=False")
  return AxisLabeller({name: Labeller(cfg, params, tokenizer, prompter, const.for_axis(name), lc,
                                      mesh, batch_size) for name in const.axis_names})


def sample_and_label(cfg, params, tokenizer, fmt: str, labeller, prompts: Sequence[dict], lc,
                     key, batch_size: int, mesh=None) -> list:
  """The label stage's comparisons for `prompts` ({id, messages}): the policy (cfg,
  params) answers each prompt twice at the label section's temperature and budget,
  and `labeller` judges each pair. Every draw comes from `key`, so a chunk of the
  label stage or a refresh of online RLAIF gives the same records when rerun.

  Returns {id, prompt, response_a, response_b, <the labeller's fields>} per prompt."""
  import jax
  from cai_jax import sampling
  k_resp, k_label, k_rng = jax.random.split(key, 3)
  msgs = [it["messages"] for it in prompts]
  comps = sampling.generate(cfg, params, tokenizer, [m for m in msgs for _ in range(2)],
                            fmt=fmt, max_new_tokens=int(lc.max_new_tokens),
                            temperature=float(lc.temperature), top_p=float(lc.top_p),
                            seed=sampling.key_seed(k_resp), batch_size=batch_size, mesh=mesh,
                            progress=False, truncate_long_prompts=True, desc="responses")
  pairs = [{"id": it["id"], "prompt": it["messages"],
            "response_a": comps[2 * j].text.strip(),
            "response_b": comps[2 * j + 1].text.strip()} for j, it in enumerate(prompts)]
  labels = labeller(pairs, np.random.default_rng(sampling.key_seed(k_rng)), sampling.key_seed(k_label))
  return [dict(p, **lab) for p, lab in zip(pairs, labels)]
