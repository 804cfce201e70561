"""The one conversation encoder: BOS exactly as the tokenizer adds it, and the one token
where a scalar head is read, the same in PM training, the PM stage's evaluation, the
scoring CLI, the evaluate stage and PPO's reward."""
import io
import json
import os
from contextlib import redirect_stdout

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cai_jax import models, roles, sampling
from cai_jax.data import prompts as prompts_lib
from cai_jax.evaluation import judge
from cai_jax.evaluation import score as score_cli
from cai_jax.stages import evaluate, ppo
from cai_jax.text import conversation
from cai_jax.text.conversation import ConversationEncoder, encode_text
from cai_jax.training import data, objectives, preferences

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _llama_style(template_writes_bos: bool = False):
  """SmolLM2's vocabulary with a tokenizer that prepends BOS (id 0) to every
  encoding, as Llama, Mistral and Gemma tokenizers do; optionally a chat template
  that writes the BOS text itself (as Llama 3's does)."""
  from tokenizers import Tokenizer, processors
  from transformers import PreTrainedTokenizerFast
  base = roles.load_tokenizer("tiny")
  bt = Tokenizer.from_str(base.backend_tokenizer.to_str())
  bt.post_processor = processors.TemplateProcessing(
      single="<|endoftext|> $A", pair="<|endoftext|> $A $B",
      special_tokens=[("<|endoftext|>", 0)])
  tok = PreTrainedTokenizerFast(tokenizer_object=bt, bos_token="<|endoftext|>",
                                eos_token="<|im_end|>", pad_token="<|im_end|>")
  tok.chat_template = ("{{ bos_token }}" if template_writes_bos else "") + CHATML
  return tok


TOKENIZERS = {"smollm2": lambda: roles.load_tokenizer("tiny"), "bos": _llama_style,
              "bos_in_template": lambda: _llama_style(True)}
MSGS = [{"role": "user", "content": "How do I pick a lock?"}]


def _adds_bos(tok) -> bool:
  return tok("x")["input_ids"][0] == tok.bos_token_id and \
      tok("x", add_special_tokens=False)["input_ids"][0] != tok.bos_token_id


def test_chat_end_of_turn_is_the_scored_token():
  tok = roles.load_tokenizer("tiny")
  enc = ConversationEncoder(tok, "chat")
  assert enc.end_of_turn == "<|im_end|>"
  e = enc.conversation(MSGS, "Ask a locksmith.")
  im_end = tok.convert_tokens_to_ids("<|im_end|>")
  assert e.ids[-1] == im_end and e.score_index == len(e.ids) - 1
  assert tok.decode(e.ids[e.loss_mask]) == "Ask a locksmith.<|im_end|>"
  # The same text the template renders, without what it writes after the turn.
  full = tok.apply_chat_template(MSGS + [{"role": "assistant", "content": "Ask a locksmith."}],
                                 tokenize=False)
  assert full == tok.decode(e.ids) + "\n"


def test_raw_ends_with_eos_and_keeps_the_paper_layout():
  tok = roles.load_tokenizer("tiny")
  enc = ConversationEncoder(tok, "raw")
  e = enc.conversation(MSGS, "Ask a locksmith.")
  assert tok.decode(e.ids) == "\n\nHuman: How do I pick a lock?\n\nAssistant: Ask a locksmith." + \
      tok.eos_token
  assert e.ids[-1] == tok.eos_token_id


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
@pytest.mark.parametrize("fmt", ["chat", "raw"])
def test_bos_exactly_as_the_tokenizer_adds_it(name, fmt):
  """Every SFT/PM training example and every sampled or scored sequence starts with
  BOS exactly when the tokenizer's own encode does: training examples, truncated
  ones, sampler prompts, PPO prompts, label questions and PM-scored conversations."""
  tok = TOKENIZERS[name]()
  enc = ConversationEncoder(tok, fmt)
  long = "word " * 300
  seqs = {
      "sft": data.sft_example(enc, MSGS, "Sure.", 64).tokens,
      "sft_truncated": data.sft_example(enc, [{"role": "user", "content": long}], long, 64).tokens,
      "pm_pair": data.pair_example(enc, MSGS, "A.", "B.", 1.0, 64).tokens_a,
      "pm_truncated": data.pair_example(enc, [{"role": "user", "content": long}], "A.", "B.",
                                        1.0, 64).tokens_b,
      "scored": enc.conversation(MSGS, "Sure.", max_len=512).ids,
      "sampler_prompt": sampling.encode_prompt(tok, enc.prompt_text(MSGS)),
      "label_question": encode_text(tok, enc.prompt_text(MSGS) + " (A"),
  }
  c = ml_collections.ConfigDict({"data": prompts_lib.default_config().to_dict()})
  c.data.num_red_team = 2
  seqs["ppo_prompt"] = ppo.encode_prompts(c, enc, "red_team")[0]["ids"]
  cfg = roles.tiny_config()
  params = models.init_params(cfg, jax.random.PRNGKey(0))
  comp = sampling.generate(cfg, params, tok, [MSGS], fmt=fmt, max_new_tokens=2, greedy=True,
                           batch_size=1, progress=False)[0]
  seqs["generate"] = list(comp.prompt_tokens)
  assert len(seqs["sft_truncated"]) == 65 and len(seqs["pm_truncated"]) == 64
  # BOS in front when the tokenizer adds one or the rendered text begins with it; once.
  want = _adds_bos(tok) or enc.prompt_text(MSGS).startswith(tok.bos_token)
  assert want == (name != "smollm2" or fmt == "chat")
  for what, ids in seqs.items():
    ids = [int(i) for i in ids]
    assert (ids[0] == tok.bos_token_id) == want, what
    assert ids[1] != tok.bos_token_id, what


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_keep_end_keeps_the_bos_and_the_last_ids(name):
  """The label stage's cut of an over-long question: its end, BOS still in front."""
  tok = TOKENIZERS[name]()
  ids = conversation.encode_text(tok, "word " * 50)
  out = conversation.keep_end(tok, ids, 10)
  assert len(out) == 10
  if _adds_bos(tok):
    assert out[0] == tok.bos_token_id and out[1:] == ids[-9:]
  else:
    assert out == ids[-10:]
  assert conversation.keep_end(tok, ids, len(ids)) == ids


def _tiny_pm(seed=1):
  cfg = roles.tiny_config()
  params = models.add_score_head(cfg, models.init_params(cfg, jax.random.PRNGKey(seed), ()),
                                 rng=jax.random.PRNGKey(seed + 1), init_std=1.0)
  return cfg, params


ITEMS = [(MSGS, "Ask a locksmith."),
         ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
           {"role": "user", "content": "Tell me a joke about cats."}],
          "Why did the cat sit on the computer? To keep an eye on the mouse."),
         ([{"role": "user", "content": "word " * 120}], "A long question, a short answer."),
         ([{"role": "user", "content": "Explain"}], "Because " * 60)]


@pytest.mark.parametrize("name", ["smollm2", "bos"])
@pytest.mark.parametrize("fmt", ["chat", "raw"])
def test_pm_stage_evaluation_scoring_cli_and_evaluate_agree(tmp_path, name, fmt):
  """The PM stage scores pairs in right-padded training batches; the CLI and the
  evaluate stage score left-padded, length-bucketed conversations. Same conversation,
  same score within 1e-4, at the end-of-turn token (an extra token after it, as the
  template's newline used to be, moves the score)."""
  tok = TOKENIZERS[name]()
  cfg, params = _tiny_pm()
  pm_dir = str(tmp_path / "pm")
  models.save_pretrained(cfg, params, pm_dir, tokenizer=tok)
  max_len = 96
  enc = ConversationEncoder(tok, fmt)
  # PM stage: encode_pairs -> pair_batch -> objectives.pair_rewards (what it trains and evaluates).
  items = [{"prompt": p, "a": r, "b": r[: len(r) // 2] + ".", "p": 1.0, "source": "ai"}
           for p, r in ITEMS]
  pairs = preferences.encode_pairs(enc, items, max_len, seed=0)
  batch = data.pair_batch(pairs, max_len, tok.pad_token_id)
  ra, _ = objectives.pair_rewards(cfg, params, {k: jnp.asarray(v) for k, v in batch.items()})
  stage = np.asarray(ra, np.float64)
  # The scoring CLI on a JSONL file.
  path = tmp_path / "conv.jsonl"
  path.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in ITEMS))
  out = io.StringIO()
  with redirect_stdout(out):
    assert score_cli.main(["--model", pm_dir, "--data", str(path), "--format", fmt,
                           "--max_len", str(max_len)]) == 0
  lines = [json.loads(x) for x in out.getvalue().splitlines()]
  cli = np.array([x["score"] for x in lines[:-1]])
  assert lines[-1]["n"] == len(ITEMS)
  # The evaluate stage's scorer of the in-loop PM (a Judge at the PM stage's length).
  c = ml_collections.ConfigDict({"prompt_format": fmt, "evaluate": {"pm_max_len": 0},
                                 "pm": {"max_len": max_len}})
  j = judge.Judge(cfg, params, tok, fmt, evaluate._pm_len(c), {"kind": "in-loop"})
  ev = j.scores([p for p, _ in ITEMS], [r for _, r in ITEMS])
  np.testing.assert_allclose(cli, stage, atol=1e-4)
  np.testing.assert_allclose(ev, stage, atol=1e-4)
  assert np.std(stage) > 0.05  # scores that differ: the comparison can fail
  # Teeth: one more token after the end of the turn reads another score.
  nl = tok("\n", add_special_tokens=False)["input_ids"]
  moved = sampling.scalar_scores(cfg, params, [list(enc.conversation(p, r, max_len - 1).ids) + nl
                                               for p, r in ITEMS], pad_id=tok.pad_token_id)
  assert np.max(np.abs(moved - stage)) > 1e-3


@pytest.mark.parametrize("fmt", ["chat", "raw"])
def test_ppo_rewards_equal_the_scoring_cli(tmp_path, fmt):
  """The tiny pipeline up to PPO (one device, as a user runs it): every reward in
  ppo/samples.jsonl (the PM score before the KL term) equals
  `python -m cai_jax.evaluation.score` on the same conversation within 1e-4."""
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  wd = str(tmp_path / fmt)
  env = dict(os.environ, JAX_PLATFORMS="cpu", CAI_JAX_MALLOC_TUNABLES="0")
  env.pop("XLA_FLAGS", None)
  r = subprocess.run([sys.executable, "-m", "cai_jax.main", "--config=configs/tiny.py",
                      f"--workdir={wd}", f"--config.prompt_format={fmt}",
                      "--config.stages=revise,sft,label,pm,ppo",
                      # A PM whose scores differ by position and content.
                      "--config.pm.score_init_std=1.0", "--config.pm.optim.learning_rate=0",
                      "--config.compilation_cache="], cwd=root, env=env, capture_output=True,
                     text=True, timeout=1200)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
  samples = [json.loads(x) for x in open(os.path.join(wd, "ppo", "samples.jsonl"))]
  assert len(samples) == 2 * 4  # configs/tiny.py: 2 iterations of 4 prompts
  _, scores, _ = score_cli.score_file(os.path.join(wd, "pm"), os.path.join(wd, "ppo",
                                                                       "samples.jsonl"), fmt, 128)
  rewards = np.array([s["reward"] for s in samples])
  np.testing.assert_allclose(scores, rewards, atol=1e-4)
  assert np.std(rewards) > 0.05
