"""DPO family on the soft AI labels: the losses and their gradients by hand, the
sequence log-probs against an unpadded per-row run, learning on a tiny model,
and the stage end to end with an exact resume."""
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cai_jax import models, roles
from cai_jax.stages import dpo
from cai_jax.training import data, losses, objectives
from cai_jax.utils import InputError

from test_preference import _config as _pm_config, _write_human, _write_label

F = np.float32


def _sig(x):
  return 1.0 / (1.0 + math.exp(-x))


def test_preference_losses_hand_computed():
  d = np.array([2.0, -1.0, 0.0, 0.0], F)
  p = np.array([1.0, 0.8, 0.5, 0.3], F)
  beta = 0.5
  soft = losses.preference_loss(d, p, beta, "soft")
  want = [-math.log(_sig(1.0)),
          -(0.8 * math.log(_sig(-0.5)) + 0.2 * math.log(_sig(0.5))),
          math.log(2.0), math.log(2.0)]
  np.testing.assert_allclose(soft, want, rtol=1e-5)
  # dpo rounds the label: 1, 1, ½ (tie), 0.
  hard = losses.preference_loss(d, p, beta, "dpo")
  np.testing.assert_allclose(hard, [-math.log(_sig(1.0)), -math.log(_sig(-0.5)), math.log(2.0),
                                    -math.log(_sig(0.0))], rtol=1e-5)
  # ipo: p (Δ − 1/2β)² + (1 − p)(Δ + 1/2β)², with 1/2β = 1.
  ipo = losses.preference_loss(d, p, beta, "ipo")
  np.testing.assert_allclose(ipo, [1.0, 0.8 * 4 + 0.2 * 0, 1.0, 1.0], rtol=1e-5)
  with pytest.raises(ValueError, match="unknown kind"):
    losses.preference_loss(d, p, beta, "kto")


def test_preference_loss_gradients():
  beta = 0.5
  g = lambda kind, d, p: float(jax.grad(  # noqa: E731
      lambda x: losses.preference_loss(x, jnp.float32(p), beta, kind))(jnp.float32(d)))
  # Soft form: ∂/∂Δ = β (σ(βΔ) − p).
  for d, p in ((2.0, 1.0), (-1.0, 0.8), (0.7, 0.3)):
    assert g("soft", d, p) == pytest.approx(beta * (_sig(beta * d) - p), rel=1e-5)
  # p = ½: zero gradient exactly at Δ = 0, and only there.
  assert g("soft", 0.0, 0.5) == 0.0
  assert g("soft", 1.0, 0.5) > 0 and g("soft", -1.0, 0.5) < 0
  # ipo: 2(Δ − (2p − 1)/(2β)).
  assert g("ipo", 0.3, 0.8) == pytest.approx(2 * (0.3 - 0.6 / (2 * beta)), rel=1e-5)
  # dpo with a decided label keeps pushing: its gradient never vanishes.
  assert g("dpo", 10.0, 0.8) < 0


def _tiny():
  cfg = roles.tiny_config()
  return cfg, models.init_params(cfg, jax.random.PRNGKey(0)), roles.load_tokenizer("tiny")


def test_sequence_logprobs_equal_an_unpadded_per_row_run():
  from cai_jax.text.conversation import ConversationEncoder
  cfg, params, tok = _tiny()
  enc = ConversationEncoder(tok, "raw")
  L = 48
  pairs = [data.dpo_pair(enc, [{"role": "user", "content": f"Question {i}" + " x" * i}],
                         "Yes." * (i + 1), "No, never.", 0.7, L) for i in range(3)]
  batch = data.dpo_batch(pairs, L, 0)
  la, lb = objectives.pair_sequence_logprobs(cfg, params, batch)
  for i, pr in enumerate(pairs):
    for side, got in (("a", la[i]), ("b", lb[i])):
      ex = getattr(pr, side)
      ids = jnp.asarray(ex.tokens[None, :-1])
      out = models.forward(cfg, params, ids, jnp.arange(ids.shape[1])[None], jnp.ones_like(ids,
                           bool), heads=("lm",))
      lp = losses.token_logprobs(out["logits"], jnp.asarray(ex.tokens[None, 1:]))[0]
      want = float(jnp.sum(jnp.where(jnp.asarray(ex.loss_mask[1:]), lp, 0.0)))
      assert float(got) == pytest.approx(want, abs=1e-4)
      assert ex.loss_mask.sum() > 0


@pytest.mark.parametrize("kind", ["soft", "dpo", "ipo"])
def test_each_loss_learns_the_labelled_preference_on_a_tiny_model(kind):
  """Pairs whose A answers with the target token and B with others, labelled p = 0.9:
  the probability of the target token after the prompt (the known reward) rises."""
  V, P, N, TARGET = 32, 4, 4, 7
  cfg = models.tiny(vocab_size=V, hidden_size=32, intermediate_size=64, num_heads=8,
                    num_kv_heads=4, head_dim=4, max_position_embeddings=64)
  params = models.init_params(cfg, jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  pairs = []
  for _ in range(16):
    prompt = rng.integers(8, V, P)
    other = rng.integers(8, V, N)
    mk = lambda resp: data.SFTExample(  # noqa: E731
        np.concatenate([prompt, resp]).astype(np.int32),
        np.concatenate([np.zeros(P, bool), np.ones(N, bool)]))
    pairs.append(data.DPOPair(mk(np.full(N, TARGET)), mk(other), 0.9))
  L = P + N - 1
  ref = jax.jit(lambda p, b: objectives.pair_sequence_logprobs(cfg, p, b))(
      params, data.dpo_batch(pairs, L, 0))
  for pr, a, b in zip(pairs, *map(np.asarray, ref)):
    pr.ref_a, pr.ref_b = float(a), float(b)
  batch = data.dpo_batch(pairs, L, 0)

  def reward(p):
    """Mean probability of the target token as the first response token."""
    toks = jnp.asarray(batch["tokens_a_BxL"][:, :P])
    out = models.forward(cfg, p, toks, jnp.arange(P)[None].repeat(len(pairs), 0),
                         jnp.ones_like(toks, bool), heads=("lm",))
    return float(jnp.mean(jax.nn.softmax(out["logits"][:, -1])[:, TARGET]))

  loss_fn = objectives.dpo_loss_fn(cfg, beta=0.1, kind=kind)
  tx = optax.adam(3e-3)
  opt = tx.init(params)

  @jax.jit
  def step(p, o):
    (l, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(p, batch, None)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, l, aux

  r0 = reward(params)
  _, _, l0, aux0 = step(params, opt)
  # At the reference Δ = 0 (up to float noise between two compiled programs).
  assert abs(float(aux0["margin"])) < 1e-5
  assert float(l0) == pytest.approx(25.0 if kind == "ipo" else math.log(2.0), rel=1e-4)
  for _ in range(30):
    params, opt, l, aux = step(params, opt)
  r1 = reward(params)
  assert r0 < 0.1, r0
  assert float(l) < float(l0)
  if kind == "ipo":
    # IPO regresses Δ on the bounded target (2p − 1)/(2β) = 4 nats: it gets there
    # and stops, so the target token gains a bounded amount.
    assert float(aux["margin"]) / 0.1 == pytest.approx(4.0, abs=0.4)
    assert r1 > r0 + 0.03, (kind, r0, r1)
  else:
    assert r1 > r0 + 0.3, (kind, r0, r1)
  assert float(aux["accuracy"]) == 1.0


def _stage_config():
  c = _pm_config()
  c.dpo = dpo.default_config()
  d = c.dpo
  d.max_len, d.batch_size, d.eval_fraction = 40, 8, 0.25
  d.optim.learning_rate = 1e-3
  d.max_steps, d.num_epochs = 8, 4
  d.checkpoint_every, d.progress, d.async_checkpoint = 3, False, False
  return c


def test_dpo_stage_trains_exports_and_resumes_exactly(tmp_path, monkeypatch):
  from cai_jax.training import loop

  def workdir(name):
    wd = str(tmp_path / name)
    _write_label(os.path.join(wd, "label"))
    return wd

  full = workdir("full")
  c = _stage_config()
  c.dpo.human_data = (_write_human(str(tmp_path / "helpful.jsonl")),)
  c.dpo.human_fraction = 0.25
  s = dpo.run(c, full)
  assert s["steps"] == 8 and s["loss"] == "soft"
  assert s["num_train_pairs"] == 30 + 10
  assert s["eval"]["ai_pairs"] == 10 and s["eval"]["human_pairs"] == 6
  # Refusal vs compliance with p = 0.8: the margin sides with the label on held-out pairs.
  assert s["eval"]["ai_accuracy"] >= 0.8, s["eval"]
  ref = os.path.join(full, "dpo", dpo.REFERENCE_FILE)
  assert os.path.exists(ref)
  _, want = models.load_pretrained(os.path.join(full, "dpo", "final"))

  # Killed after the checkpoint at step 6, then run again: bitwise the same policy.
  killed = workdir("killed")
  real = loop.train

  def dying(**kw):
    kw["num_steps"] = 7
    real(**kw)
    raise KeyboardInterrupt("simulated kill")

  monkeypatch.setattr(loop, "train", dying)
  with pytest.raises(KeyboardInterrupt):
    dpo.run(c, killed)
  monkeypatch.setattr(loop, "train", real)
  assert not os.path.exists(os.path.join(killed, "dpo", "DONE"))
  s2 = dpo.run(c, killed)
  assert s2["resumed_from"] == 7
  _, got = models.load_pretrained(os.path.join(killed, "dpo", "final"))
  for a, b in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got)):
    assert (np.asarray(a) == np.asarray(b)).all()


def test_dpo_stage_without_labels_is_input_error(tmp_path):
  with pytest.raises(InputError, match="preferences.jsonl: AI preference labels not found"):
    dpo.run(_stage_config(), str(tmp_path))
