"""SFT train step on SmolLM2-135M-Instruct: cai_jax vs PyTorch + transformers.

  .venv/bin/python benchmarks/train_step.py [--batch 8] [--seq 256] [--repeats 4] [--warmup 2]
      [--logits_chunk 0] [--layers 30] [--loss_on_all_tokens]

Both frameworks run the same step on the same weights in one process, under
the same glibc malloc settings (cai_jax/runtime.py; the script re-executes
itself with them): forward,
masked next-token cross-entropy on the second half of each row (the
"response"), backward and an AdamW update, batch 8 x 256 tokens. cai_jax
applies the LM head only to blocks of positions that carry loss (the response
half here); torch/transformers applies it to every position. MFU is the
training FLOPs cai_jax executes (3 x forward: matmuls + attention scores, with
the LM head on the positions it covers) per second over the machine's float32
matmul rate measured in the same run (best of XLA and torch on 2048^3);
`mfu_all_position_logits` counts the LM head at every position instead.
`--loss_on_all_tokens` puts every position in the loss, for both frameworks.
Timings alternate between the frameworks and keep the best of `repeats` runs
each, because the machine is shared. The last line printed is JSON.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cai_jax import cpu_backend  # noqa: E402

# Same allocator set-up for every framework measured here (see cai_jax/runtime.py).
cpu_backend.reexec_with_malloc_tunables()

from cai_jax import models, sharding as shd  # noqa: E402
from cai_jax.training import flops as flops_lib, loop, objectives, optim  # noqa: E402
from cai_jax.training import state as state_lib  # noqa: E402


def matmul_rates(n=2048, reps=3):
  import torch
  jr = flops_lib.matmul_flops_rate(n, reps)
  a, b = torch.ones(n, n), torch.ones(n, n)
  a @ b
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    a @ b
    best = min(best, time.perf_counter() - t)
  return jr, 2.0 * n ** 3 / best


def make_batch(B, L, vocab, seed=0, all_tokens=False):
  rng = np.random.default_rng(seed)
  seq = rng.integers(3, vocab, size=(B, L + 1)).astype(np.int32)
  loss_mask = np.zeros((B, L), np.float32)
  loss_mask[:, 0 if all_tokens else L // 2:] = 1.0  # second half is the "response"
  return {"tokens_BxL": seq[:, :-1], "targets_BxL": seq[:, 1:], "loss_mask_BxL": loss_mask,
          "mask_BxL": np.ones((B, L), bool)}


def torch_step_fn(hf_dir, batch, lr):
  import torch
  import transformers
  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8,
                          weight_decay=0.0)
  ids = torch.from_numpy(batch["tokens_BxL"].astype(np.int64))
  # HF shifts labels inside: label at t+1 is the target of position t.
  labels = np.full(batch["tokens_BxL"].shape, -100, np.int64)
  labels[:, 1:] = np.where(batch["loss_mask_BxL"][:, :-1] > 0, batch["targets_BxL"][:, :-1], -100)
  full_labels = torch.from_numpy(labels)
  attn = torch.ones_like(ids)

  def step():
    out = model(input_ids=ids, attention_mask=attn, labels=full_labels)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(out.loss)
  return step


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=256)
  ap.add_argument("--repeats", type=int, default=4)
  ap.add_argument("--warmup", type=int, default=2,
                  help="untimed steps per framework first (allocator heaps reach steady state)")
  ap.add_argument("--logits_chunk", type=int, default=0)
  ap.add_argument("--layers", type=int, default=0, help="keep only the first k layers (quick runs)")
  ap.add_argument("--no_torch", action="store_true")
  ap.add_argument("--loss_on_all_tokens", action="store_true")
  args = ap.parse_args()
  import torch
  torch.set_num_threads(os.cpu_count() or 2)

  cfg, params = models.load_pretrained("smollm2")
  if args.layers:
    params = {k: v for k, v in params.items()
              if not k.startswith("layers_") or int(k.split("_")[1]) < args.layers}
    cfg = cfg.replace(num_layers=args.layers)
  B, L = args.batch, args.seq
  batch = make_batch(B, L, cfg.vocab_size, all_tokens=args.loss_on_all_tokens)
  lr = 1e-5

  t_steps = None
  if not args.no_torch:
    hf_dir = tempfile.mkdtemp(prefix="cai_bench_")
    models.save_pretrained(cfg, params, hf_dir)
    t_steps = torch_step_fn(hf_dir, batch, lr)

  mesh = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  oc = optim.default_optim_config()
  oc.learning_rate = lr
  tx = optim.make_optimizer(oc)
  st = state_lib.create_train_state(params, tx, cfg, mesh)
  del params
  step_fn = loop.make_train_step(objectives.sft_loss_fn(cfg, args.logits_chunk), tx, st, mesh,
                                 batch)
  dev_batch = shd.shard_batch(batch, mesh)
  rng = jax.random.PRNGKey(0)
  t = time.perf_counter()
  compiled = step_fn.lower(st, dev_batch, rng).compile()
  compile_s = time.perf_counter() - t

  def j_step():
    nonlocal st
    st, m = compiled(st, dev_batch, rng)
    return float(jax.device_get(m["loss"]))

  jax_loss0 = j_step()  # warm-up: the first runs grow the heaps to their steady size
  torch_loss0 = t_steps() if t_steps else None
  for _ in range(args.warmup - 1):
    j_step()
    if t_steps:
      t_steps()
  jt, tt, mm_j, mm_t = [], [], [], []
  for _ in range(args.repeats):
    # The matmul yardstick is re-measured beside every step (the machine is shared).
    a, b = matmul_rates(reps=1)
    mm_j.append(a)
    mm_t.append(b)
    t = time.perf_counter()
    j_step()
    jt.append(time.perf_counter() - t)
    if t_steps:
      t = time.perf_counter()
      t_steps()
      tt.append(time.perf_counter() - t)
  mm_jax, mm_torch = max(mm_j), max(mm_t)
  peak = max(mm_jax, mm_torch)
  all_flops = flops_lib.train_flops_per_token(cfg, L) * B * L
  # Positions the LM head covers: whole blocks up to the row with the most loss tokens.
  blk = objectives.lm_head_block(L, args.logits_chunk)
  head_pos = B * min(-(-int((batch["loss_mask_BxL"] != 0).sum(1).max()) // blk) * blk, L)
  step_flops = all_flops - 3 * 2.0 * cfg.vocab_size * cfg.hidden_size * (B * L - head_pos)
  j_best = min(jt)
  res = {
      "mfu": step_flops / j_best / peak,
      "mfu_all_position_logits": all_flops / j_best / peak,
      "lm_head_positions": head_pos, "loss_on_all_tokens": args.loss_on_all_tokens,
      "ratio_vs_torch": (min(tt) / j_best) if tt else None,
      "jax_step_s": j_best, "torch_step_s": min(tt) if tt else None,
      "jax_tokens_per_s": B * L / j_best,
      "torch_tokens_per_s": (B * L / min(tt)) if tt else None,
      "jax_gflops": step_flops / j_best / 1e9,
      "torch_gflops": (all_flops / min(tt) / 1e9) if tt else None,
      "torch_mfu": (all_flops / min(tt) / peak) if tt else None,
      "matmul_gflops_jax": mm_jax / 1e9, "matmul_gflops_torch": mm_torch / 1e9,
      "step_tflop": step_flops / 1e12, "loss_jax": jax_loss0, "loss_torch": torch_loss0,
      "compile_s": compile_s, "warmup_steps": args.warmup, "batch": B, "seq": L, "layers": cfg.num_layers,
      "logits_chunk": args.logits_chunk, "jax_times": jt, "torch_times": tt,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "malloc_tunables": cpu_backend.malloc_tunables_active(),
  }
  print(json.dumps(res))


if __name__ == "__main__":
  main()
