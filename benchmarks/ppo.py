"""PPO iteration time split into rollout (sampling), reward (PM score plus the
reference / policy / value forward passes and GAE) and train (the K-epoch
update), and the overhead: wall time of the loop minus the sum of the three.

  .venv/bin/python benchmarks/ppo.py [--model smollm2|tiny] [--batch 8] \\
      [--new_tokens 32] [--iters 3] [--epochs 2] [--minibatches 2]

The policy, reference, PM and value model are the same architecture: the PM is
the policy with a random scalar head (this benchmark measures speed, not
learning). One warm-up iteration compiles everything and is not timed. The
overhead must stay at or below 15% of the wall time. The last line is JSON.
"""
import argparse
import json
import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cai_jax import cpu_backend  # noqa: E402

# Same allocator set-up for every framework measured here (see cai_jax/runtime.py).
cpu_backend.reexec_with_malloc_tunables()

from cai_jax import models, sampling, sharding  # noqa: E402
from cai_jax.data import prompts as prompts_lib  # noqa: E402
from cai_jax.rl import config as rl_config, prompt_mix, rollout, trainer as trainer_lib  # noqa: E402
from cai_jax.sampling import bucket_length  # noqa: E402
from cai_jax.text import stop_strings  # noqa: E402
from cai_jax.text.conversation import ConversationEncoder  # noqa: E402
from cai_jax import roles  # noqa: E402
from cai_jax.stages import ppo  # noqa: E402

MAX_OVERHEAD = 0.15


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--model", default="smollm2")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--new_tokens", type=int, default=32)
  ap.add_argument("--iters", type=int, default=3)
  ap.add_argument("--epochs", type=int, default=2)
  ap.add_argument("--minibatches", type=int, default=2)
  args = ap.parse_args()

  cfg, policy, tok = roles.load(args.model)
  policy = models.drop_heads(policy, ("lm",))
  pm = models.drop_heads(models.add_score_head(cfg, policy, jax.random.PRNGKey(1), 0.05),
                         ("score",))
  config = ml_collections.ConfigDict({"prompt_format": "chat",
                                      "data": prompts_lib.default_config()})
  c = rl_config.ppo_section()
  c.batch_size, c.max_new_tokens = args.batch, args.new_tokens
  c.num_epochs, c.num_minibatches = args.epochs, args.minibatches
  mesh = sharding.make_mesh((-1, 1, 1))
  pm_sharded = sharding.shard_params(pm, cfg, mesh)
  eos = sampling.eos_ids_of(cfg, tok)
  enc = ConversationEncoder(tok, "chat")
  reward = rollout.PMReward(cfg, pm_sharded, enc, eos, stop_strings("chat", tok), 512)
  trainer = trainer_lib.PPOTrainer(c, policy_cfg=cfg, policy_params=policy, value_cfg=cfg,
                                   value_params=pm, reward_fn=reward, mesh=mesh, eos_ids=eos)
  del policy
  state = trainer.init_state()
  red = ppo.encode_prompts(config, enc, "red_team")
  helpful = ppo.encode_prompts(config, enc, "helpful")
  mix = prompt_mix.PromptMix(red, helpful, 0.5, args.batch, seed=0)
  P = bucket_length(max(len(p["ids"]) for p in red + helpful))
  pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
  rng = jax.random.PRNGKey(0)

  phases = {"rollout": 0.0, "reward": 0.0, "train": 0.0}
  tokens = 0
  wall = 0.0
  for it in range(args.iters + 1):
    t0 = time.perf_counter()
    batch = mix.next_batch()
    toks, mask = prompt_mix.left_pad([p["ids"] for p in batch], P, pad)
    rng, key = jax.random.split(rng)
    state, m, _ = trainer.iteration(state, toks, mask, key,
                                    prompts=[p["messages"] for p in batch])
    jax.block_until_ready(state["step"])
    dt = time.perf_counter() - t0
    print(f"iteration {it}{' (warm-up)' if it == 0 else ''}: {dt:.2f}s generate "
          f"{m['time/generate']:.2f} reward {m['time/reward'] + m['time/forward']:.2f} "
          f"train {m['time/train']:.2f} reward_mean {m['reward']:.3f} kl {m['kl']:.3f}",
          flush=True)
    if it == 0:
      continue
    wall += dt
    phases["rollout"] += m["time/generate"]
    phases["reward"] += m["time/reward"] + m["time/forward"]
    phases["train"] += m["time/train"]
    tokens += m["response_length"] * args.batch
  n = args.iters
  per = {k: v / n for k, v in phases.items()}
  overhead = (wall - sum(phases.values())) / wall
  result = {
      "benchmark": "ppo", "model": args.model, "batch": args.batch,
      "new_tokens": args.new_tokens, "epochs": args.epochs, "minibatches": args.minibatches,
      "iters": n, "sec_per_iter": wall / n,
      "rollout_sec": per["rollout"], "reward_sec": per["reward"], "train_sec": per["train"],
      "overhead_frac": overhead, "max_overhead_frac": MAX_OVERHEAD,
      "tokens_per_sec": tokens / wall, "ok": overhead <= MAX_OVERHEAD,
  }
  print(json.dumps(result))
  return 0 if result["ok"] else 1


if __name__ == "__main__":
  sys.exit(main())
