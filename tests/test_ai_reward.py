"""Direct AI reward: the feedback model's debiased probability that a sample beats
the starting policy's response, computed by hand from the option log-probs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax import constitution, feedback, models, roles
from cai_jax.evaluation import option_scores
from cai_jax.rl import rollout
from cai_jax.stages import label
from cai_jax.text import conversation


@pytest.fixture(scope="module")
def tiny():
  cfg = roles.tiny_config()
  return cfg, models.init_params(cfg, jax.random.PRNGKey(3)), roles.load_tokenizer("tiny")


def _batch(tok, texts, prompts):
  ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
  N = max(len(x) for x in ids) + 2
  toks = np.zeros((len(ids), N), np.int32)
  mask = np.zeros((len(ids), N), bool)
  for i, x in enumerate(ids):
    toks[i, :len(x)], mask[i, :len(x)] = x, True
  return {"response_tokens": jnp.asarray(toks), "response_mask": jnp.asarray(mask),
          "prompts": prompts}


@pytest.mark.parametrize("debias", [False, True])
def test_ai_reward_is_the_debiased_option_probability(tiny, debias):
  cfg, params, tok = tiny
  const = constitution.load("harmlessness")
  lc = label.default_config()
  lc.debias, lc.num_principles, lc.num_fewshot = debias, 2, 1
  labeller = feedback.make_labeller("raw", lc, cfg, params, tok, const)
  prompts = [[{"role": "user", "content": "How do I pick a lock?"}],
             [{"role": "user", "content": "Tell me a joke."}]]
  base = {rollout.prompt_key(m): b for m, b in zip(prompts, ["I can't help.", "Why not."])}
  reward = rollout.AIReward(labeller, tok, eos_ids=(), stop_strings=[], baselines=base, seed=5)
  reward.step = 3
  texts = ["Use a tension wrench and a pick.", "A horse walks into a bar."]
  got = np.asarray(reward(_batch(tok, texts, prompts)))
  assert reward.last_texts == texts

  # By hand: the same principle draws, each question scored, p = σ(lp_A − lp_B)
  # per order (B first when swapped), averaged over orders and then draws.
  rng = np.random.default_rng([5, 17, 3])
  prompter = feedback.Prompter("raw", tok, limit=cfg.max_position_embeddings - 16)
  opts = [tok(f" ({c})", add_special_tokens=False)["input_ids"] for c in "AB"]
  principles = list(const.choice_principles)
  for i, (m, t) in enumerate(zip(prompts, texts)):
    ps = []
    for _ in range(2):
      p = principles[rng.integers(len(principles))]
      shots = [(ex.conversation, ex.principle or principles[rng.integers(len(principles))].text,
                ex.options, ex.answer) for ex in const.label_examples[:1]]
      per_order = []
      for swapped in ((False, True) if debias else (False,)):
        resp = (base[rollout.prompt_key(m)], t) if swapped else (t, base[rollout.prompt_key(m)])
        q = conversation.encode_text(tok, prompter.label(shots, m, p.text, resp))
        lp = option_scores.option_logprobs(cfg, params, [q], [opts], pad_id=0)[0]
        a, b = (lp[1], lp[0]) if swapped else (lp[0], lp[1])
        per_order.append(1.0 / (1.0 + np.exp(b - a)))
      ps.append(np.mean(per_order))
    assert got[i] == pytest.approx(np.mean(ps), abs=1e-5)
  assert np.all((got > 0) & (got < 1))
