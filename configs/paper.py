"""The paper's settings (Bai et al. 2022, "Constitutional AI"), sized for a TPU pod.

  python -m cai_jax.main --workdir=gs://BUCKET/cai_paper \
      --config=configs/paper.py:model=/ckpt/helpful_hf,pretrained=/ckpt/base_hf,red_team=/data/red_team_attempts.jsonl.gz,helpful=/data/helpful-base/train.jsonl.gz,human_data=/data/helpful-base/train.jsonl.gz
  python -m cai_jax.main --config=configs/paper.py:model=... --workdir=... --sweep=labels

`arg` is a comma-separated list of key=value:
  model           HF dir of the helpful (RLHF) model the paper starts from (required)
  pretrained      HF dir of the pretrained model SL-CAI fine-tunes (paper); default: `model`
  feedback_model  the pretrained model that labels (paper); default: `model`
  red_team        hh-rlhf red-team-attempts file (paper: 42,496 human prompts)
  helpful         hh-rlhf helpful-* comparisons, for helpfulness prompts
  human_data      hh-rlhf helpful-* comparisons the PM mixes with the AI harmlessness
                  labels (paper: 135,296). Required: without it the PM learns harmlessness
                  alone; pass human_fraction=0 to run so on purpose.
  human_fraction  share of human comparisons in the PM's training mix (default 0.5)
  pm_pretrain     hh-rlhf comparisons for PM pretraining
  sft_lr          SL-CAI learning rate (paper: half the pretraining rate)
The paper used 52B models; any HF llama/mistral/qwen2/gemma checkpoint loads.
Sweeps beside it reproduce the paper's ablations.
"""
from cai_jax import pipeline


def _args(arg):
  out = {}
  for kv in (arg or "").split(","):
    if kv.strip():
      k, _, v = kv.partition("=")
      out[k.strip()] = v.strip()
  return out


def get_config(arg=None):
  a = _args(arg)
  c = pipeline.base_config()
  c.model = a.get("model", "")            # required: the helpful (RLHF) model, HF dir
  c.feedback_model = a.get("feedback_model", "")  # paper: a pretrained LM labels; "" = model
  c.dtype = "bfloat16"                    # TPU: bf16 params and compute (log-softmax in f32)
  c.prompt_format = "raw"                 # the paper's "Human: ... Assistant:" layout
  c.constitution = "harmlessness"         # our 16 + 16 principles (paper: its own 16 + 16)
  c.mesh.ici = (1, -1, 1)                 # FSDP over the slice; set (1, -1, 4) for tensor=4
  c.mesh.dcn = None                       # multi-slice: e.g. (-1, 1, 1) for data over slices
  c.data.red_team = a.get("red_team", "builtin")  # paper: 42,496 human + 140,335 generated
  c.data.helpful = a.get("helpful", "builtin")    # paper: 135,296 human helpfulness prompts
  c.data.num_red_team = -1                # all of them
  c.data.num_helpful = -1
  c.data.eval_fraction = 0.01             # a held-out slice for the evaluations

  c.revise.num_revisions = 4              # paper: 4 critique -> revision rounds
  c.revise.temperature = 1.0              # paper: T = 1 for every sample
  c.revise.top_p = 1.0
  c.revise.num_principles = 16            # paper: a pool of 16 principles, one drawn per round
  c.revise.num_fewshot = -1               # all few-shot critique/revision dialogues
  c.revise.history = False                # paper: each round revises the latest revision alone
  c.revise.helpful_samples = 2            # paper: 2 responses per helpfulness prompt
  c.revise.max_new_tokens = 256           # response budget
  c.revise.critique_max_new_tokens = 256
  c.revise.revision_max_new_tokens = 256
  c.revise.batch_size = 256               # sampler batch per host
  c.revise.chunk_size = 4096              # prompts per resumable output chunk
  _stage_settings(c, a)
  c.evaluate.samples_per_prompt = 4       # responses per held-out prompt and snapshot
  c.evaluate.max_new_tokens = 256
  return c


def _stage_settings(c, a):
  """SL-CAI fine-tuning, AI labels, PM and PPO as the paper describes them."""
  c.sft.init_from = a.get("pretrained", "")  # paper: fine-tune a pretrained model ("" = model)
  c.sft.num_epochs = 1.0                  # paper: one epoch over revisions + helpful samples
  c.sft.optim.schedule = "constant"       # paper: constant learning rate
  # Paper: 0.5x the model's pretraining learning rate. Set it for your model, e.g.
  # Llama-3-8B pretrained at a 3e-4 peak -> 1.5e-4.
  c.sft.optim.learning_rate = float(a.get("sft_lr", 1.5e-4))
  c.sft.batch_size = 1024                 # paper: batch size 1024 sequences
  c.sft.max_len = 1024                    # tokens per sequence
  c.sft.packing = True                    # fewer padding tokens at this scale
  c.sft.num_rounds = -1                   # paper: train on the revisions of every round
  c.sft.include_helpful = True            # paper: plus the helpful model's samples
  c.sft.logits_chunk = 256                # bounds the logits memory of a 1024-token row
  c.sft.checkpoint_every = 50             # preemptible pods: checkpoint often

  c.label.temperature = 1.0               # paper: T = 1 for the compared responses
  c.label.num_principles = 1              # paper: one principle sampled per comparison (of 16)
  c.label.hard_labels = False             # paper: soft labels (normalised log-probs) work best
  c.label.options_header = True           # paper: "Options:" before (A)/(B)
  c.label.debias = True                   # ours: both option orders, probabilities averaged
  c.label.debias_mean = "probability"
  c.label.cot_dialogue = True             # paper: CoT questions as Human:/Assistant: turns
  c.label.cot = False                     # RL-CAI; set True for RL-CAI w/ chain of thought
  c.label.cot_clamp = (0.4, 0.6)          # paper: CoT probabilities clamped to 40-60%
  c.label.max_new_tokens = 256            # response budget
  c.label.batch_size = 256                # sampler batch per host

  # Paper: the AI harmlessness labels mixed with 135,296 human helpfulness comparisons.
  c.pm.human_data = tuple(p for p in a.get("human_data", "").split(";") if p)
  c.pm.human_fraction = float(a.get("human_fraction", 0.5))
  c.pm.require_human_data = True          # refuse to start without them (or human_fraction=0)
  c.pm.pretrain_data = tuple(p for p in a.get("pm_pretrain", "").split(";") if p)
  c.pm.pretrain_steps = 2000 if a.get("pm_pretrain") else 0
  c.pm.batch_size = 512                   # pairs per step (not stated in the paper)
  c.pm.max_len = 1024

  c.ppo.temperature = 1.0                 # sample from the policy itself
  c.ppo.batch_size = 512                  # prompts per iteration
  c.ppo.num_minibatches = 8
  c.ppo.num_iterations = 2000
  c.ppo.red_team_fraction = 0.5           # red-team and helpfulness prompts mixed
  c.ppo.max_new_tokens = 256
  c.ppo.kl.kind = "fixed"                 # a fixed KL penalty to the SL-CAI reference
  c.ppo.kl.beta = 0.05

  # Beyond the paper (the dpo stage, off unless listed in config.stages): the same
  # labels and human comparisons as the PM, the policy trained on them directly.
  c.dpo.human_data = c.pm.human_data
  c.dpo.human_fraction = c.pm.human_fraction
  c.dpo.batch_size = 64                   # pairs per step
  c.dpo.max_len = 512                     # prompt + one response
  c.dpo.optim.learning_rate = 5e-7


def sweep_revisions(add):
  """Paper Fig. 5: PM score after 1-4 revisions (SL-CAI-n)."""
  for n in (1, 2, 3, 4):
    add(**{"revise.num_revisions": n})


def sweep_principles(add):
  """Paper Fig. 6: number of constitutional principles in the pool."""
  for k in (1, 2, 4, 8, 16):
    add(**{"revise.num_principles": k})


def sweep_critique(add):
  """Paper Fig. 7: critiqued revisions against direct revisions."""
  add(**{"revise.direct_revision": False})
  add(**{"revise.direct_revision": True})


def sweep_labels(add):
  """Soft against hard AI labels (paper Sec. 4.1); later points reuse revise + sft."""
  add(**{"label.hard_labels": False})
  add(**{"label.hard_labels": True, "reuse_stages": ("revise", "sft")})


def sweep_cot_clamp(add):
  """Chain-of-thought labels with no clamp, 20-80% and 40-60% (paper Fig. 9)."""
  add(**{"label.cot": True, "label.cot_clamp": ()})
  for clamp in ((0.2, 0.8), (0.4, 0.6)):
    add(**{"label.cot": True, "label.cot_clamp": clamp, "reuse_stages": ("revise", "sft")})
