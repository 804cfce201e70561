"""Continuous batching vs the static sampler vs transformers `generate`, on the
revise stage's own workload.

  .venv/bin/python benchmarks/continuous.py [--prompts 48] [--slots 16]
      [--new_tokens 256] [--fewshot 4] [--hf_batches N]

The prompts are the revise stage's critique prompts, built as the stage builds
them (`constitution.revision_messages` / `render_revision_prompt`, SmolLM2's
chat template): the paper's few-shot critique/revision dialogues in front, then
a red-team conversation and its initial response from the paper's SL-CAI
chains (../shared/data/cai_paper/samples/*_SLMADISON.jsonl) and the critique
request of the principle that chain used. SmolLM2-135M-Instruct samples at
T = 1 with a `new_tokens` budget and the stage's stop strings, so rows stop at
their natural lengths.

- engine: `sampling.engine.generate_tokens` with `slots` decode slots.
- static: `sampling.sample` (packed prefill, shared prefix) in batches of
  `slots` prompts sorted by length (what `sampling.generate` ran before the
  engine), with the same per-prompt keys. Both draw each row's tokens from
  the same keys; the script reports the share of rows whose tokens are
  identical (a row can part where the two programs' float rounding differs
  at a near-tie of the inverse CDF).
- transformers: `generate` at the same batch size on the static sampler's
  batches, with the same stop strings and EOS: all of them by default, or
  the first `hf_batches` (the shortest prompts: a rate over those favours
  transformers, whose padded rows and cache grow with the longest prompt).

Each sampler runs once, timed with its compilations (as a stage's first call
pays them), or, with --warmup, once to compile and then once timed (a stage's
later calls, the steady state of a long run); the first run's rates are then
reported too (`*_first_*`), with the share of rows the timed run repeats.
The figure is useful tokens per second: tokens emitted up to and including
each row's EOS or stop, over wall time. The last line printed is JSON.
"""
import argparse
import glob
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cai_jax import cpu_backend  # noqa: E402

cpu_backend.reexec_for_sampling()

import jax  # noqa: E402

from cai_jax import constitution as C  # noqa: E402
from cai_jax import models, sampling, text  # noqa: E402
from cai_jax.sampling import engine  # noqa: E402
from cai_jax.sampling import sampler as sampler_lib  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..",
                    "shared", "data", "cai_paper")


def log(msg):
  print(msg, file=sys.stderr, flush=True)


def revise_prompts(tok, n: int, fewshot: int) -> list:
  paper = C.import_paper(os.path.join(DATA, "prompts"))
  recs = []
  for f in sorted(glob.glob(os.path.join(DATA, "samples", "*_SLMADISON.jsonl"))):
    with open(f, encoding="utf-8") as fh:
      recs += [json.loads(line) for line in fh if line.strip()]
  out = []
  # Every round of every chain: its critique prompt, then its revision prompt
  # (with the chain's own critique), showing the latest revision alone as the
  # stage does by default (revise.history=False).
  for k in range(4):
    for rec in recs:
      conv = [m for m in text.parse_transcript(rec["rl_prompt"]) if m["content"].strip()]
      init = rec["initial_response"][0]["sample"].strip()
      rounds = [{"principle": paper.principle(c["cst_key"]), "critique": c["critique"]["sample"],
                 "revision": c["revision"]["sample"].strip()} for c in rec["cst"][:k]]
      principle = paper.principle(rec["cst"][k]["cst_key"])
      for step, crit in (("critique", None), ("revision", rec["cst"][k]["critique"]["sample"])):
        msgs = C.revision_messages(conv, init, rounds, principle, step,
                                   paper.critique_examples[:fewshot], crit, history=False)
        out.append(sampling.encode_prompt(tok, C.render_revision_prompt(msgs, "chat", tok)))
  if len(out) < n:
    raise SystemExit(f"{DATA}/samples: {len(out)} prompts, fewer than --prompts={n}")
  return out[:n]


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--prompts", type=int, default=48)
  ap.add_argument("--slots", type=int, default=16)
  ap.add_argument("--new_tokens", type=int, default=256)
  ap.add_argument("--fewshot", type=int, default=4)
  ap.add_argument("--hf_batches", type=int, default=-1,
                  help="transformers batches to run, shortest first (-1: all, 0: none)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--warmup", action="store_true", help="time a second run, after compiling")
  args = ap.parse_args()

  path = models.smollm2_gguf_path()
  cfg, params = models.load_pretrained(path)
  tok = models.load_tokenizer(path)
  ids = revise_prompts(tok, args.prompts, args.fewshot)
  stops = C.stop_strings("chat", tok)
  matcher = sampling.from_strings(tok, stops, cfg.vocab_size)
  eos = sampling.eos_ids_of(cfg, tok)
  pad = cfg.pad_token_id
  N, B = args.new_tokens, args.slots
  keys = sampler_lib.row_keys(jax.random.PRNGKey(args.seed), np.arange(len(ids)))
  kw = dict(max_new_tokens=N, temperature=1.0, eos_ids=eos, stop_seqs=matcher, pad_id=pad)
  log(f"{len(ids)} revise prompts of {min(map(len, ids))}-{max(map(len, ids))} tokens; "
      f"shared header {engine.common_prefix_len(ids)} tokens")

  def run_engine():
    out = engine.generate_tokens(cfg, params, ids, keys, slots=B, **kw)
    return out.tokens_BxN, out.lengths_B

  order = np.argsort([len(x) for x in ids], kind="stable")
  batches = [order[i:i + B] for i in range(0, len(order), B)]

  def run_static():
    toks = np.full((len(ids), N), pad, np.int32)
    lengths = np.zeros(len(ids), np.int32)
    for rows in batches:
      L = sampler_lib.bucket_length(max(len(ids[j]) for j in rows))
      t = np.full((len(rows), L), pad, np.int32)
      m = np.zeros((len(rows), L), bool)
      for r, j in enumerate(rows):
        t[r, L - len(ids[j]):], m[r, L - len(ids[j]):] = ids[j], True
      out = sampling.sample(cfg, params, t, m, 0, keys=keys[np.asarray(rows)], **kw)
      toks[rows], lengths[rows] = out.tokens_BxN, out.lengths_B
    return toks, lengths

  result = {"model": "SmolLM2-135M-Instruct", "workload": "revise critique and revision prompts",
            "prompts": len(ids), "slots": B, "new_tokens": N, "fewshot": args.fewshot,
            "prompt_tokens_mean": round(float(np.mean([len(x) for x in ids])), 1),
            "shared_prefix": engine.common_prefix_len(ids)}

  def share_same(a, b):
    """The share of rows whose lengths and tokens are equal in runs a and b."""
    (ta, la), (tb, lb) = a, b
    return round(float(np.mean([la[i] == lb[i] and (ta[i, :n] == tb[i, :n]).all()
                                for i, n in enumerate(la)])), 3)

  times = {}
  for name, fn in (("engine", run_engine), ("static", run_static)):
    if args.warmup:
      t0 = time.perf_counter()
      first = fn()
      t_first = time.perf_counter() - t0
      log(f"{name}: compile + first run {t_first:.1f}s")
      result[f"{name}_first_s"] = round(t_first, 2)
      result[f"{name}_first_tokens_per_s"] = round(int(first[1].sum()) / t_first, 1)
    t0 = time.perf_counter()
    out = fn()
    times[name] = time.perf_counter() - t0
    if args.warmup:  # the same prompts and keys: equal wherever float rounding agrees
      result[f"{name}_rows_as_first_run"] = share_same(out, first)
    log(f"{name}: timed run {times[name]:.1f}s")
    result[f"{name}_compiled_in_run"] = not args.warmup
    if name == "engine":
      eng = out
    else:
      st = out
  eng_len, st_len = eng[1], st[1]
  useful = int(eng_len.sum())
  result["useful_tokens"] = useful
  result["rows_at_budget"] = int((eng_len == N).sum())
  result["mean_row_tokens"] = round(useful / len(ids), 1)
  result["static_useful_tokens"] = int(st_len.sum())
  result["rows_identical_to_static"] = share_same(eng, st)
  for name in times:
    result[f"{name}_s"] = round(times[name], 2)
    result[f"{name}_tokens_per_s"] = round(useful / times[name], 1)
  result["static_tokens_per_s"] = round(int(st_len.sum()) / times["static"], 1)
  result["engine_vs_static"] = round(result["engine_tokens_per_s"] / result["static_tokens_per_s"],
                                     3)

  hf_batches = batches if args.hf_batches < 0 else batches[:args.hf_batches]
  if hf_batches:
    import torch
    import transformers
    torch.set_num_threads(2)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
    hf_useful, hf_time = 0, 0.0
    for bi, rows in enumerate(hf_batches):
      L = max(len(ids[j]) for j in rows)
      t = np.full((len(rows), L), pad, np.int64)
      m = np.zeros((len(rows), L), np.int64)
      for r, j in enumerate(rows):
        t[r, L - len(ids[j]):], m[r, L - len(ids[j]):] = ids[j], 1
      torch.manual_seed(args.seed + bi)
      t0 = time.perf_counter()
      with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor(t), attention_mask=torch.tensor(m),
                          do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                          max_new_tokens=N, eos_token_id=list(eos), pad_token_id=pad,
                          stop_strings=list(stops), tokenizer=tok)
      hf_time += time.perf_counter() - t0
      gen = out[:, L:].numpy()
      for row in gen:
        # Tokens up to the first EOS; a stop string ends generation of its row
        # by EOS-padding the rest, so the pad count marks it too.
        stop_at = [k for k, x in enumerate(row) if x in eos or x == pad]
        hf_useful += (stop_at[0] + 1) if stop_at else len(row)
      log(f"transformers batch {bi}: {hf_time:.1f}s so far, {hf_useful} tokens")
    result["hf_batches"] = len(hf_batches)
    result["hf_prompts"] = int(sum(len(r) for r in hf_batches))
    result["hf_useful_tokens"] = hf_useful
    result["hf_s"] = round(hf_time, 2)
    result["hf_tokens_per_s"] = round(hf_useful / hf_time, 1)
    result["engine_vs_hf"] = round(result["engine_tokens_per_s"] / result["hf_tokens_per_s"], 3)
    if args.warmup:  # transformers compiles nothing: its one run against the first runs
      result["engine_first_vs_hf"] = round(
          result["engine_first_tokens_per_s"] / result["hf_tokens_per_s"], 3)
  if args.warmup:
    result["engine_first_vs_static_first"] = round(
        result["engine_first_tokens_per_s"] / result["static_first_tokens_per_s"], 3)
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  main()
