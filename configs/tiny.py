"""A random tiny model through every stage in a few minutes on 2 CPU cores; tests use it.

  python -m cai_jax.main --config=configs/tiny.py --workdir=/tmp/cai_tiny

The numbers it produces are noise (the model is random); it exercises every
code path of `make demo` quickly: sampling, training, checkpoints, exports,
labels, PPO, evaluation and the report.
"""
from cai_jax import pipeline


def get_config(arg=None):
  del arg
  c = pipeline.base_config()
  c.model = "tiny"               # random 2-layer d=64 model with SmolLM2's tokenizer
  c.data.num_red_team = 6        # train-split red-team prompts used by revise/label/ppo
  c.data.num_helpful = 4         # train-split helpfulness prompts
  c.data.eval_fraction = 0.2     # 9 of the 45 built-in prompts per kind held out

  c.revise.num_revisions = 2     # two rounds, so PM-vs-revision has three points
  c.revise.num_fewshot = 1       # one few-shot dialogue keeps prompts short
  c.revise.max_new_tokens = 8    # token budgets: the random model's text is noise anyway
  c.revise.critique_max_new_tokens = 8
  c.revise.revision_max_new_tokens = 8
  c.revise.helpful_samples = 1   # one sample per helpfulness prompt
  c.revise.write_tfds = False    # jsonl only (the TFDS path has its own tests)

  c.sft.max_len = 128            # tokens per row
  c.sft.batch_size = 4           # rows per step
  c.sft.max_steps = 3            # three optimiser steps
  c.sft.eval_fraction = 0.0      # no held-out loss
  c.sft.tensorboard = False      # no event files
  c.sft.async_checkpoint = False  # checkpoints written before the stage returns

  c.label.max_new_tokens = 8     # response budget of the two sampled responses
  c.label.num_fewshot = 1        # one labelling example in front of each question
  c.label.write_tfds = False     # jsonl only

  c.pm.max_len = 128             # tokens per response sequence
  c.pm.batch_size = 2            # pairs per step
  c.pm.max_steps = 3             # three optimiser steps
  c.pm.eval_fraction = 0.2       # one or two held-out pairs for accuracy
  c.pm.tensorboard = False
  c.pm.async_checkpoint = False

  c.ppo.num_iterations = 2       # two rollout + update iterations
  c.ppo.batch_size = 4           # prompts per iteration
  c.ppo.num_minibatches = 2      # minibatches per epoch
  c.ppo.num_epochs = 1               # passes over each rollout batch
  c.ppo.max_new_tokens = 8       # response budget
  c.ppo.checkpoint_every = 1     # a checkpoint every iteration (exercises resume)
  c.ppo.log_samples_every = 1    # log samples every iteration
  c.ppo.tensorboard = False
  c.ppo.online.prompts_per_refresh = 4  # online RLAIF (--sweep=online): 4 fresh pairs,
  c.ppo.online.pm_steps = 2             # two PM steps of 2 pairs per refresh
  c.ppo.online.pm_batch_size = 2

  c.dpo.max_len = 128            # tokens per prompt + response row
  c.dpo.batch_size = 2           # pairs per step
  c.dpo.max_steps = 3            # three optimiser steps
  c.dpo.eval_fraction = 0.2      # one or two held-out pairs
  c.dpo.tensorboard = False
  c.dpo.async_checkpoint = False

  c.evaluate.num_prompts = 3     # held-out prompts per kind
  c.evaluate.max_new_tokens = 8  # response budget
  # The held-out judge: a tiny random model trained briefly on human comparisons (it is
  # at chance, and the report says so); real runs use configs/demo.py's settings.
  c.evaluate.judge.steps = 8     # training steps
  c.evaluate.judge.max_len = 64  # tokens per conversation
  c.evaluate.judge.max_pairs = 400       # human pairs read (of 2,312)
  c.evaluate.judge.max_eval_pairs = 80   # held-out pairs for its accuracy
  c.evaluate.judge.train_top_layers = -1  # both blocks
  c.evaluate.elo_bootstrap = 50  # bootstrap resamples for the Elo intervals
  return c


def sweep_revisions(add):
  """Number of critique -> revision rounds (configs/demo.py's sweep at two of
  its points: tests run it, and a point is a whole tiny pipeline)."""
  for n in (1, 3):
    add(**{"revise.num_revisions": n})


def sweep_rl(add):
  """PPO, GRPO, RLOO, soft DPO and the direct AI reward from the same SL-CAI model,
  labels and PM, compared by the held-out judge (`pipeline.sweep_rl`)."""
  pipeline.sweep_rl(add)


def sweep_online(add):
  """The PM trained once against refreshed every 2 and every iteration on the
  current policy's labelled samples (`pipeline.sweep_online`)."""
  pipeline.sweep_online(add)


def sweep_axes(add):
  """A scalar PM against a head per constitution axis with two reward weightings,
  on the same per-axis labels (`pipeline.sweep_axes`)."""
  pipeline.sweep_axes(add)
