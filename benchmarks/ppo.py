"""RL iteration time split into rollout (sampling), reward (the PM's score),
forward (the policy / reference / value forward passes and the advantages) and
train (the K-epoch update), and the overhead: wall time of the loop minus the
sum of the four; also the bytes the iteration holds (train state, reference, PM).

  .venv/bin/python benchmarks/ppo.py [--algorithm ppo|grpo|rloo] [--model smollm2|tiny] \\
      [--batch 8] [--group 4] [--new_tokens 32] [--iters 3] [--epochs 2] [--minibatches 2]

The policy, reference, PM and value model are the same architecture: the PM is
the policy with a random scalar head (this benchmark measures speed, not
learning). GRPO and RLOO sample `--group` responses per prompt and hold no value
model. One warm-up iteration compiles everything and is not timed. The
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
from cai_jax.training.state import tree_bytes  # noqa: E402

MAX_OVERHEAD = 0.15


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--algorithm", default="ppo", choices=trainer_lib.ALGORITHMS)
  ap.add_argument("--group", type=int, default=4)
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
  c.algorithm, c.group_size = args.algorithm, args.group
  critic = trainer_lib.has_critic(c)
  group = 1 if critic else args.group
  mesh = sharding.make_mesh((-1, 1, 1))
  pm_sharded = sharding.shard_params(pm, cfg, mesh)
  eos = sampling.eos_ids_of(cfg, tok)
  enc = ConversationEncoder(tok, "chat")
  reward = rollout.PMReward(cfg, pm_sharded, enc, eos, stop_strings("chat", tok), 512)
  trainer = trainer_lib.PPOTrainer(c, policy_cfg=cfg, policy_params=policy,
                                   value_cfg=cfg if critic else None,
                                   value_params=pm if critic else None, reward_fn=reward,
                                   mesh=mesh, eos_ids=eos)
  del policy
  state = trainer.init_state()
  held = {"train_state": tree_bytes(state), "reference": tree_bytes(trainer.rollout.ref_params),
          "pm": tree_bytes(pm_sharded)}
  red = ppo.encode_prompts(config, enc, "red_team")
  helpful = ppo.encode_prompts(config, enc, "helpful")
  mix = prompt_mix.PromptMix(red, helpful, 0.5, args.batch // group, seed=0)
  P = bucket_length(max(len(p["ids"]) for p in red + helpful))
  pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
  rng = jax.random.PRNGKey(0)

  phases = {"rollout": 0.0, "reward": 0.0, "forward": 0.0, "train": 0.0}
  tokens = 0
  wall = 0.0
  for it in range(args.iters + 1):
    t0 = time.perf_counter()
    batch = [p for p in mix.next_batch() for _ in range(group)]
    toks, mask = prompt_mix.left_pad([p["ids"] for p in batch], P, pad)
    rng, key = jax.random.split(rng)
    state, m, _ = trainer.iteration(state, toks, mask, key,
                                    prompts=[p["messages"] for p in batch])
    jax.block_until_ready(state["step"])
    dt = time.perf_counter() - t0
    print(f"iteration {it}{' (warm-up)' if it == 0 else ''}: {dt:.2f}s generate "
          f"{m['time/generate']:.2f} reward {m['time/reward']:.2f} forward "
          f"{m['time/forward']:.2f} train {m['time/train']:.2f} reward_mean {m['reward']:.3f} "
          f"kl {m['kl']:.3f}", flush=True)
    if it == 0:
      continue
    wall += dt
    phases["rollout"] += m["time/generate"]
    phases["reward"] += m["time/reward"]
    phases["forward"] += m["time/forward"]
    phases["train"] += m["time/train"]
    tokens += m["response_length"] * args.batch
  n = args.iters
  per = {k: v / n for k, v in phases.items()}
  overhead = (wall - sum(phases.values())) / wall
  result = {
      "benchmark": "ppo", "algorithm": args.algorithm, "model": args.model,
      "batch": args.batch, "group": group,
      "new_tokens": args.new_tokens, "epochs": args.epochs, "minibatches": args.minibatches,
      "iters": n, "sec_per_iter": wall / n,
      "rollout_sec": per["rollout"], "reward_sec": per["reward"],
      "forward_sec": per["forward"], "train_sec": per["train"],
      "held_gib": {k: round(v / 2**30, 4) for k, v in held.items()},
      "overhead_frac": overhead, "max_overhead_frac": MAX_OVERHEAD,
      "tokens_per_sec": tokens / wall, "ok": overhead <= MAX_OVERHEAD,
  }
  print(json.dumps(result))
  return 0 if result["ok"] else 1


if __name__ == "__main__":
  sys.exit(main())
