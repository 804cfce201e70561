"""AI-feedback labelling speed: comparisons per second with SmolLM2.

  .venv/bin/python benchmarks/label.py [--model smollm2|tiny] [--n 4] [--fewshot 1]

Each comparison is one labelling question per option order (position
debiasing on, as in the label stage), built with the harmlessness
constitution and a real red-team prompt. Ours: `option_scores.option_logprobs`
scores each option set in one jitted call (the question prefilled once into a
KV cache, then both options " (A)" / " (B)" in one batched forward pass over
it). Peer, measured in the same run on the same questions: the sampler's
`score_tokens`, which scores every option as its own full row (prompt +
option), one option set per batch. Response sampling is not timed (the
sampler benchmark covers it). One warm-up pass compiles every shape and is not
timed. Ours must be at least as fast as the peer. The last line is JSON.
"""
import argparse
import json
import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cai_jax import cpu_backend  # noqa: E402

# Same allocator set-up for every framework measured here (see cai_jax/runtime.py).
cpu_backend.reexec_with_malloc_tunables()

from cai_jax import constitution as constitution_lib  # noqa: E402
from cai_jax import sampling  # noqa: E402
from cai_jax.data import prompts as prompts_lib  # noqa: E402
from cai_jax.evaluation import option_scores  # noqa: E402
from cai_jax import roles  # noqa: E402
from cai_jax import feedback  # noqa: E402
from cai_jax.evaluation import multiple_choice as mc  # noqa: E402

# Two fixed replies per prompt (the policy's samples are not what is timed).
REPLIES = ("I can't help with that, but I can point you to safer options if you tell me more.",
           "Sure. Here is a quick way to do it without anyone noticing.")


def questions(tok, n: int, fewshot: int, fmt: str):
  const = constitution_lib.load("harmlessness")
  red = prompts_lib.load_prompts(None, "red_team", "all")[:n]
  prompter = feedback.Prompter(fmt, tok)
  rng = np.random.default_rng(0)
  texts = []
  for it in red:
    principle = const.choice_principles[rng.integers(len(const.choice_principles))].text
    shots = [(ex.conversation, const.choice_principles[rng.integers(
        len(const.choice_principles))].text, ex.options, ex.answer)
             for ex in const.label_examples[:fewshot]]
    for resp in (REPLIES, REPLIES[::-1]):  # both option orders
      texts.append(prompter.label(shots, it["messages"], principle, list(resp)))
  return [sampling.encode_prompt(tok, t) for t in texts]


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--model", default="smollm2")
  ap.add_argument("--n", type=int, default=4, help="comparisons (each scored in 2 orders)")
  ap.add_argument("--fewshot", type=int, default=1, help="labelling examples per question")
  ap.add_argument("--format", default="chat", choices=("raw", "chat"))
  ap.add_argument("--repeats", type=int, default=1)
  args = ap.parse_args()

  cfg, params, tok = roles.load(args.model)
  prompts = questions(tok, args.n, args.fewshot, args.format)
  opts = [tok(mc.letter_option(j), add_special_tokens=False)["input_ids"] for j in (0, 1)]
  pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0

  def ours():
    # One option set per call, as the label stage does for long questions.
    return [option_scores.option_logprobs(cfg, params, [p], [opts], pad_id=pad)[0]
            for p in prompts]

  def peer():
    return [np.array([float(np.sum(x)) for x in sampling.score_tokens(
        cfg, params, [p, p], opts, batch_size=2, pad_id=pad)]) for p in prompts]

  a, b = ours(), peer()  # warm-up: compiles every shape
  err = max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))
  t_ours, t_peer = [], []
  for _ in range(args.repeats):
    t = time.perf_counter()
    ours()
    t_ours.append(time.perf_counter() - t)
    t = time.perf_counter()
    peer()
    t_peer.append(time.perf_counter() - t)
  ours_s, peer_s = min(t_ours), min(t_peer)
  out = {
      "benchmark": "label", "model": args.model, "comparisons": args.n,
      "option_sets": len(prompts), "debias": True, "fewshot": args.fewshot,
      "format": args.format,
      "mean_prompt_tokens": float(np.mean([len(p) for p in prompts])),
      "comparisons_per_s": args.n / ours_s, "peer_comparisons_per_s": args.n / peer_s,
      "speedup_vs_rows": peer_s / ours_s, "max_abs_logprob_diff": err,
      "ok": bool(peer_s / ours_s >= 1.0 and err < 1e-2),
  }
  print(json.dumps(out))
  return 0 if out["ok"] else 1


if __name__ == "__main__":
  sys.exit(main())
