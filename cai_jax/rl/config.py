"""The `ppo` config section (every field commented)."""
from __future__ import annotations

import ml_collections

from cai_jax.models import lora
from cai_jax.rl import online
from cai_jax.training import optim


def ppo_section() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.algorithm = "ppo"           # "ppo": value model + GAE (the paper's RL-CAI); "grpo": group-
                                # normalised advantages; "rloo": leave-one-out baseline. Both
                                # critic-free: no value model is created
  c.num_iterations = 100        # RL iterations (one rollout batch + update each)
  c.batch_size = 16             # sampled responses per iteration (ppo: = prompts;
                                # grpo/rloo: batch_size / group_size prompts)
  c.reward = "pm"               # "pm": the preference model's score; "ai": the feedback model's
                                # judgement itself, no PM (P(sample better than the starting
                                # policy's greedy response) under config.label's question:
                                # principle drawn per sample, debiasing, ensembling, CoT)
  c.group_size = 4              # grpo/rloo: responses sampled per prompt (>= 2)
  c.group_std = True            # grpo: divide by the group's std; False = Dr. GRPO (mean only)
  c.kl_in = "reward"            # grpo/rloo: β·KL "reward" (Σ k1 subtracted from each
                                # sequence's score) or "loss" (β·k3 per token, GRPO's form);
                                # ppo always puts it in the per-token reward
  c.red_team_fraction = 0.5     # share of red-team prompts in each batch; rest helpfulness
  c.max_prompt_tokens = 256     # prompts are left-padded to this; longer ones are dropped
  c.max_new_tokens = 64         # response length limit
  c.temperature = 1.0           # sampling temperature (1.0: sample from the policy itself)
  c.missing_eos_penalty = 1.0   # subtracted from the PM score when no EOS within the limit
  c.normalize_rewards = False   # divide scores by a running std and subtract its running mean
  # a PM with a head per axis: the reward is sum_a w_a (s_a - mean_a) / std_a over running
  # per-axis statistics; "harm:1,helpfulness:0.5" (unnamed axes 0), "" = every axis 1/A
  c.axis_weights = ""
  c.gamma = 1.0                 # ppo: discount over response tokens
  c.lam = 0.95                  # ppo: GAE lambda
  c.whiten_advantages = True    # ppo: zero-mean, unit-variance advantages over real tokens
  c.num_epochs = 4              # passes over each rollout batch
  c.num_minibatches = 4         # minibatches per pass (batch_size must divide)
  c.micro_batches = 0           # gradient accumulation within a minibatch (same update):
                                # 0 = fitted to device memory (config.hbm_gib); k: k per step
  c.clip_eps = 0.2              # policy ratio clip
  c.value_clip_eps = 0.2        # ppo: value clip around the rollout values
  c.vf_coef = 0.5               # ppo: value-loss weight
  c.ent_coef = 0.0              # entropy bonus weight
  c.kl = ml_collections.ConfigDict()
  c.kl.kind = "adaptive"        # "adaptive" (target, horizon) or "fixed" beta
  c.kl.beta = 0.05              # initial (or fixed) KL coefficient
  c.kl.target = 6.0             # adaptive: target KL per sequence (nats)
  c.kl.horizon = 10000          # adaptive: horizon in sequences
  c.policy_optim = optim.default_optim_config()   # policy optimizer
  c.policy_optim.learning_rate = 1e-6
  c.value_optim = optim.default_optim_config()    # ppo: value optimizer
  c.value_optim.learning_rate = 1e-5
  c.train_top_layers = -1       # -1 trains all of policy and value; k: only the top k blocks
                                # + final norm + heads (saves optimizer memory)
  c.lora = lora.default_config()  # lora.rank > 0: policy and value train rank-r adapters (and
                                # the value head) only; the reference is the base without them
  c.init_from = ""              # policy / reference: "" = WORKDIR/sft (when sft runs or ran),
                                # else config.model (any form of cai_jax.roles)
  c.pm = ""                     # preference model (reward "pm"): "" = WORKDIR/pm
  c.online = online.default_config()  # online iterated RLAIF: online.refresh_every K > 0
                                # refreshes the PM on the current policy's labelled samples
                                # every K iterations (cai_jax/rl/online.py)
  c.value_init = "pm"           # ppo: value model starts from "pm" or "policy" (new zero score head)
  c.checkpoint_every = 10       # iterations between checkpoints (and at the end)
  c.keep_checkpoints = 2        # checkpoints kept
  c.pm_max_len = 0              # tokens of a PM-scored conversation (end kept); 0 = pm.max_len
  c.log_samples_every = 10      # iterations between samples shown in TensorBoard (0 = never);
                                # samples.jsonl holds every sample of every iteration
  c.num_logged_samples = 4      # responses shown each time
  c.tensorboard = True          # TensorBoard scalars and samples in WORKDIR/ppo/tb
  c.progress = True             # tqdm progress bar
  return c
