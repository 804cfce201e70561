"""Sampling throughput: cai_jax vs transformers `generate` on SmolLM2-135M-Instruct.

  .venv/bin/python benchmarks/sampling.py [--batches 16,64] [--new_tokens 64] [--repeats 3]
      [--no_share_prefix] [--no_pack_prefill] [--row_major_decode] [--malloc_tunables]

Both samplers run on the same GGUF weights in the same process, with chat-template
prompts and `new_tokens` tokens sampled at T=1 (no top-k/top-p, EOS ignored so
every row makes the full count). torch uses 2 threads. The prompts share the
chat template's system prompt, which cai_jax runs once per batch (the
sampler's shared-prefix path; `--no_share_prefix` turns it off), and the rest of
each prompt's prefill runs on its real tokens, not the left-padded slots (the
packed prefill; `--no_pack_prefill` turns it off). Decode steps run feature-major
(`cai_jax/models/decode.py`; its transposed weights are built in the first,
compiling run and reused; `--row_major_decode` runs the model's own layout).
The machine's f32 matmul
rate (best of XLA and torch on a large square matmul) gives the compute-bound
ceiling of rate / (2 x parameters) tokens/s. Timings alternate between the two
samplers and keep the best of `repeats` runs each, because the machine is shared (on
a 2-core VM, ten identical back-to-back runs spread over ±10%, CPU time with wall time).
Both run under glibc's default malloc with transparent huge pages
(`cpu_backend.reexec_for_sampling`: the script drops the train-step tunables that
`make bench` exports and sets glibc.malloc.hugetlb=1; `--malloc_tunables` keeps
the train-step ones). Huge pages spare cai_jax ~70k minor page faults per
batch-64 call (its KV cache is allocated afresh each call); transformers' speed
did not change with them. The last line printed is JSON.
"""
import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cai_jax import cpu_backend  # noqa: E402

# Same allocator set-up for every framework measured here: glibc's defaults plus
# transparent huge pages (cpu_backend.reexec_for_sampling), as in any sampling-only
# process; the train-step tunables of cai_jax/runtime.py only with --malloc_tunables.
if "--malloc_tunables" in sys.argv:
  cpu_backend.reexec_with_malloc_tunables()
else:
  cpu_backend.reexec_for_sampling()

from cai_jax import models, sampling  # noqa: E402

QUESTIONS = [
    "What is the capital of France?",
    "Give me three tips for sleeping better.",
    "How do I boil an egg?",
    "Explain photosynthesis to a child.",
    "Write a haiku about autumn leaves.",
    "Why is the sky blue?",
    "What should I pack for a weekend hiking trip?",
    "Summarise the plot of a detective story in two sentences.",
    "How can I politely decline a meeting invitation?",
    "What are prime numbers?",
    "Suggest a name for a friendly robot.",
    "How do vaccines work?",
    "What is a good way to start learning to paint?",
    "Describe the taste of a lemon.",
    "How far away is the Moon?",
    "Tell me a fun fact about octopuses.",
]


def log(msg):
  print(msg, file=sys.stderr, flush=True)


def chat_prompts(tok, n):
  out = []
  for i in range(n):
    msgs = [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    out.append(sampling.encode_prompt(tok, text))
  return out


def matmul_rate(n=2048, reps=5):
  """Best f32 GFLOP/s of XLA and torch on an n x n matmul."""
  import torch
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  xla = 2 * n ** 3 / best / 1e9
  ta = torch.randn(n, n)
  ta @ ta
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    ta @ ta
    best = min(best, time.perf_counter() - t)
  return max(xla, 2 * n ** 3 / best / 1e9), xla, 2 * n ** 3 / best / 1e9


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batches", default="16,64")
  ap.add_argument("--new_tokens", type=int, default=64)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--skip_hf", action="store_true")
  ap.add_argument("--no_share_prefix", action="store_true")
  ap.add_argument("--no_pack_prefill", action="store_true")
  ap.add_argument("--row_major_decode", action="store_true",
                  help="decode with the model's row-major layout (not models/decode.py)")
  ap.add_argument("--malloc_tunables", action="store_true",
                  help="run under cai_jax/runtime.py's train-step malloc tunables (arena_max=1)")
  args = ap.parse_args()
  cpu_backend.FEATURE_MAJOR_DECODE = not args.row_major_decode

  import torch
  import transformers
  torch.set_num_threads(2)

  path = models.smollm2_gguf_path()
  cfg, params = models.load_pretrained(path)
  tok = models.load_tokenizer(path)
  n_params = models.count_params(params)
  hf = None
  if not args.skip_hf:
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()

  N = args.new_tokens
  result = {"model": "SmolLM2-135M-Instruct", "params": n_params, "new_tokens": N,
            "devices": jax.device_count(), "share_prefix": not args.no_share_prefix,
            "pack_prefill": not args.no_pack_prefill,
            "feature_major_decode": not args.row_major_decode}
  for B in [int(b) for b in args.batches.split(",")]:
    prompts = chat_prompts(tok, B)
    t_np, m_np = sampling.left_pad(prompts, cfg.pad_token_id)

    def run_jax(seed):
      out = sampling.sample(cfg, params, t_np, m_np, jax.random.PRNGKey(seed), max_new_tokens=N,
                            temperature=1.0, eos_ids=(), share_prefix=not args.no_share_prefix,
                            pack_prefill=not args.no_pack_prefill)
      assert int(out.lengths_B.sum()) == B * N
      return out

    def run_hf(seed):
      torch.manual_seed(seed)
      with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor(t_np, dtype=torch.long),
                          attention_mask=torch.tensor(m_np.astype(np.int64)),
                          do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                          max_new_tokens=N, min_new_tokens=N, pad_token_id=cfg.pad_token_id)
      assert out.shape[1] - t_np.shape[1] == N
      return out

    t0 = time.perf_counter()
    run_jax(0)  # compile
    compile_s = time.perf_counter() - t0
    log(f"batch {B}: cai_jax compile + first run {compile_s:.1f}s")
    if hf is not None:
      t0 = time.perf_counter()
      run_hf(0)  # warm up
      log(f"batch {B}: transformers warm-up run {time.perf_counter() - t0:.1f}s")
    jax_best = hf_best = float("inf")
    for r in range(args.repeats):
      t0 = time.perf_counter()
      run_jax(r + 1)
      jax_best = min(jax_best, time.perf_counter() - t0)
      log(f"batch {B}: cai_jax run {time.perf_counter() - t0:.1f}s")
      if hf is not None:
        t0 = time.perf_counter()
        run_hf(r + 1)
        hf_best = min(hf_best, time.perf_counter() - t0)
        log(f"batch {B}: transformers run {time.perf_counter() - t0:.1f}s")
    jax_tps = B * N / jax_best
    result[f"batch{B}_prompt_len"] = int(t_np.shape[1])
    result[f"batch{B}_shared_prefix_len"] = (
        0 if args.no_share_prefix else sampling.shared_prefix_len(t_np, m_np))
    result[f"batch{B}_compile_s"] = round(compile_s, 2)
    result[f"batch{B}_cai_jax_tokens_per_s"] = round(jax_tps, 1)
    if hf is not None:
      hf_tps = B * N / hf_best
      result[f"batch{B}_hf_tokens_per_s"] = round(hf_tps, 1)
      result[f"batch{B}_ratio_vs_hf"] = round(jax_tps / hf_tps, 3)
    print(json.dumps({k: v for k, v in result.items() if k.startswith(f"batch{B}")}), flush=True)

  rate, xla_rate, torch_rate = matmul_rate()
  ceiling = rate * 1e9 / (2 * n_params)
  result["matmul_gflops"] = round(rate, 1)
  result["matmul_gflops_xla"] = round(xla_rate, 1)
  result["matmul_gflops_torch"] = round(torch_rate, 1)
  result["ceiling_tokens_per_s"] = round(ceiling, 1)
  result["malloc_tunables"] = cpu_backend.malloc_tunables_active()
  result["glibc_tunables"] = os.environ.get("GLIBC_TUNABLES", "")
  for B in [int(b) for b in args.batches.split(",")]:
    result[f"batch{B}_fraction_of_ceiling"] = round(
        result[f"batch{B}_cai_jax_tokens_per_s"] / ceiling, 3)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
