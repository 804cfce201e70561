"""Sampler: greedy == full recompute, log-probs == one forward pass, exact stops,
sharded == single device, bounded compilation, long-prompt handling."""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax import cpu_backend, models, sampling, sharding
from cai_jax.sampling import sampler as sampler_lib
from cai_jax.sampling import stops as stops_lib
from cai_jax import roles


@pytest.fixture(scope="module")
def tiny(peaked_tiny):
  return peaked_tiny


@pytest.fixture(scope="module")
def tiny_text():
  """A tiny random model over SmolLM2's tokenizer, for text-level tests."""
  return roles.load("tiny", seed=3)


def _left_padded(rows, pad=0):
  return sampling.left_pad(rows, pad)


def _full_logprobs(cfg, params, prompts, gens):
  """log-softmax of one no-cache forward over prompt+generation, at the generated tokens.

  Rows are left-padded to a common length; returns a list of per-row arrays."""
  seqs = [list(p) + list(g) for p, g in zip(prompts, gens)]
  t, m = _left_padded(seqs)
  logp = jax.nn.log_softmax(models.logits(cfg, params, jnp.asarray(t), jnp.asarray(m)), -1)
  logp = np.asarray(logp)
  out = []
  L = t.shape[1]
  for i, g in enumerate(gens):
    n = len(g)
    idx = np.arange(L - n - 1, L - 1)
    out.append(logp[i, idx, np.asarray(g, np.int64)])
  return out


def _greedy_reference(cfg, params, prompts, n_new):
  """Argmax decoding that recomputes the whole sequence every step (no cache).

  The batch is laid out at a fixed length: left padding, prompt, tokens so far,
  then right padding that causal attention never lets earlier tokens see."""
  P = max(len(p) for p in prompts)
  L = P + n_new
  t = np.zeros((len(prompts), L), np.int32)
  m = np.zeros((len(prompts), L), bool)
  for i, p in enumerate(prompts):
    t[i, P - len(p):P] = p
    m[i, P - len(p):P] = True
  for s in range(n_new):
    lg = np.asarray(models.logits(cfg, params, jnp.asarray(t), jnp.asarray(m)))
    nxt = lg[:, P + s - 1].argmax(-1)
    t[:, P + s] = nxt
    m[:, P + s] = True
  return t[:, P:]


PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [100], [300, 301, 302, 303, 20]]


PROGRAMS = ("feature_major", "few_rows", "row_major")


def _use_program(monkeypatch, program: str, rows: int):
  """Makes `sample` (on CPU, no mesh) decode with `decode.decode_step` (the
  default), or with the model in the few-rows program (Eigen dots) or the
  row-major YNNPACK one."""
  fm = program == "feature_major"
  monkeypatch.setattr(cpu_backend, "FEATURE_MAJOR_DECODE", fm)
  monkeypatch.setattr(cpu_backend, "FEW_ROWS", rows if program == "few_rows" else 0)
  want = cpu_backend.FEW_ROWS_COMPILER_OPTIONS if program == "few_rows" else None
  assert cpu_backend.decode_program(None, rows) == (fm, want)


def _used_decode_weights(params) -> bool:
  """Whether the last `sample` call built (or reused) decode weights of these params."""
  leaves = jax.tree_util.tree_leaves(params)
  return any(all(r() is x for r, x in zip(refs, leaves))
             for refs, _ in sampler_lib._decode_weights.entries.values())


@pytest.mark.parametrize("program", PROGRAMS)
def test_greedy_matches_full_recompute_tiny(tiny, program, monkeypatch):
  cfg, params = tiny
  _use_program(monkeypatch, program, len(PROMPTS))
  sampler_lib._decode_weights.entries.clear()
  t, m = _left_padded(PROMPTS)
  out = sampling.sample(cfg, params, t, m, jax.random.PRNGKey(0), max_new_tokens=16,
                        greedy=True, eos_ids=())
  assert _used_decode_weights(params) == (program == "feature_major")
  ref = _greedy_reference(cfg, params, PROMPTS, 16)
  np.testing.assert_array_equal(out.tokens_BxN, ref)
  assert (out.lengths_B == 16).all() and not out.finished_B.any()
  lp = _full_logprobs(cfg, params, PROMPTS, list(ref))
  np.testing.assert_allclose(out.logprobs_BxN, np.stack(lp), atol=1e-4)


@pytest.mark.parametrize("kw", [dict(temperature=1.0), dict(temperature=0.7, top_k=20),
                                dict(temperature=1.3, top_p=0.8)])
def test_sampled_logprobs_match_one_forward(tiny, kw):
  cfg, params = tiny
  t, m = _left_padded(PROMPTS)
  out = sampling.sample(cfg, params, t, m, jax.random.PRNGKey(4), max_new_tokens=12,
                        eos_ids=(), **kw)
  lp = _full_logprobs(cfg, params, PROMPTS, list(out.tokens_BxN))
  np.testing.assert_allclose(out.logprobs_BxN, np.stack(lp), atol=1e-4)
  again = sampling.sample(cfg, params, t, m, jax.random.PRNGKey(4), max_new_tokens=12,
                          eos_ids=(), **kw)
  np.testing.assert_array_equal(out.tokens_BxN, again.tokens_BxN)
  other = sampling.sample(cfg, params, t, m, jax.random.PRNGKey(5), max_new_tokens=12,
                          eos_ids=(), **kw)
  assert (out.tokens_BxN != other.tokens_BxN).any()


SHARED = list(range(40, 60))  # 20 tokens every prompt below starts with
PREFIXED = [SHARED + [5, 6, 7], SHARED + [8, 9, 10, 11, 12, 13, 14], SHARED + [100],
            SHARED + [300, 301, 302, 303, 20]]


def test_shared_prefix_len():
  t, m = _left_padded(PREFIXED)
  assert sampler_lib.shared_prefix_len(t, m) == 16  # 20 common, cut to a multiple of 8
  assert sampler_lib.shared_prefix_len(t, m, min_len=4) == 16
  # Every row keeps at least one token of its own, even when one row is the prefix.
  t, m = _left_padded([SHARED[:17], SHARED[:17] + [1, 2]])
  assert sampler_lib.shared_prefix_len(t, m) == 16
  t, m = _left_padded([SHARED[:16], SHARED[:16] + [1, 2]])
  assert sampler_lib.shared_prefix_len(t, m) == 0  # 15 < MIN_SHARED_PREFIX
  t, m = _left_padded([SHARED[:10] + [1], SHARED[:10] + [2]])
  assert sampler_lib.shared_prefix_len(t, m) == 0  # below MIN_SHARED_PREFIX
  t, m = _left_padded([SHARED + [1]])
  assert sampler_lib.shared_prefix_len(t, m) == 0  # one row: nothing to share
  assert [sampler_lib.bucket_length(n) for n in (1, 9, 64, 65, 129, 300, 1025)] == \
      [8, 16, 64, 80, 160, 384, 1536]
  # 25 common tokens (like a chat template's system prompt) share 24.
  t, m = _left_padded([SHARED + [1, 2, 3, 4, 5, 9], SHARED + [1, 2, 3, 4, 5, 6, 7, 8]])
  assert sampler_lib.shared_prefix_len(t, m) == 24
  # A long few-shot header is shared to within PREFIX_STEP tokens.
  head = list(range(1000, 1000 + 203))
  t, m = _left_padded([head + [1, 2], head + [3], head + [4, 5, 6]])
  assert sampler_lib.shared_prefix_len(t, m) == 200


def test_shared_prefix_matches_full_recompute(tiny):
  cfg, params = tiny
  t, m = _left_padded(PREFIXED)
  out = sampling.sample(cfg, params, t, m, 0, max_new_tokens=12, greedy=True, eos_ids=())
  ref = _greedy_reference(cfg, params, PREFIXED, 12)
  np.testing.assert_array_equal(out.tokens_BxN, ref)
  lp = _full_logprobs(cfg, params, PREFIXED, list(ref))
  np.testing.assert_allclose(out.logprobs_BxN, np.stack(lp), atol=1e-4)
  for kw in (dict(temperature=1.0), dict(temperature=1.3, top_p=0.8)):
    on = sampling.sample(cfg, params, t, m, 9, max_new_tokens=12, eos_ids=(), **kw)
    off = sampling.sample(cfg, params, t, m, 9, max_new_tokens=12, eos_ids=(),
                          share_prefix=False, **kw)
    np.testing.assert_array_equal(on.tokens_BxN, off.tokens_BxN)
    lp = _full_logprobs(cfg, params, PREFIXED, list(on.tokens_BxN))
    np.testing.assert_allclose(on.logprobs_BxN, np.stack(lp), atol=1e-4)


def test_pack_prompts_layout():
  t = np.array([[0, 0, 5, 6], [7, 8, 9, 10], [0, 0, 0, 11]], np.int32)
  m = t > 0
  pack_index, slot_index = sampler_lib.pack_prompts(m)
  # 7 real tokens of 12 slots, rounded up to a multiple of ceil(12 / 8) = 2;
  # the filler entry points at slot 0.
  np.testing.assert_array_equal(t.reshape(-1)[slot_index], [5, 6, 7, 8, 9, 10, 11, 0])
  pos = np.asarray(models.positions_from_mask(m)).reshape(-1)[slot_index]
  np.testing.assert_array_equal(pos, [0, 1, 0, 1, 2, 3, 0, 0])
  np.testing.assert_array_equal(pack_index, [[0, 0, 0, 1], [2, 3, 4, 5], [0, 0, 0, 6]])
  np.testing.assert_array_equal(slot_index, [2, 3, 4, 5, 6, 7, 11, 0])
  np.testing.assert_array_equal(pack_index[:, -1], [1, 5, 6])  # each row's last token
  # Real slots map to their packed token and back.
  flat = np.flatnonzero(m.reshape(-1))
  np.testing.assert_array_equal(slot_index[pack_index.reshape(-1)[flat]], flat)
  # Nothing to drop (or less than 1/8 of the slots): no packing.
  assert sampler_lib.pack_prompts(m[1:2]) is None
  m2 = np.ones((4, 8), bool)
  m2[0, 0] = False
  assert sampler_lib.pack_prompts(m2) is None


def test_packed_prefill_matches_unpacked(tiny, monkeypatch):
  """The prefill run on the real prompt tokens only gives the tokens and
  log-probs of the padded prefill, with and without a shared prefix."""
  cfg, params = tiny
  packed = []
  orig = sampler_lib.pack_prompts

  def spy(*a, **kw):
    packed.append(orig(*a, **kw) is not None)
    return orig(*a, **kw)

  monkeypatch.setattr(sampler_lib, "pack_prompts", spy)
  for rows in (PROMPTS * 2, PREFIXED):
    t, m = _left_padded(rows)
    for kw in (dict(greedy=True), dict(temperature=1.0), dict(temperature=0.8, top_p=0.9)):
      on = sampling.sample(cfg, params, t, m, 5, max_new_tokens=10, eos_ids=(), **kw)
      off = sampling.sample(cfg, params, t, m, 5, max_new_tokens=10, eos_ids=(),
                            pack_prefill=False, **kw)
      np.testing.assert_array_equal(on.tokens_BxN, off.tokens_BxN)
      np.testing.assert_allclose(on.logprobs_BxN, off.logprobs_BxN, atol=1e-5)
  assert packed == [True] * 6


def test_generate_shares_a_common_prefix_with_few_compilations(tiny_text, monkeypatch):
  """A few-shot-style prefix common to every prompt: batches share it, compile a
  bounded number of times, and give the tokens of unshared sampling."""
  cfg, params, tok = tiny_text
  head = ("Here are some examples of careful answers to questions about the weather, "
          "the sea and the hills, each one short and kind. ") * 2
  rng = np.random.default_rng(1)
  words = "the cat sat on a mat while rain fell over quiet hills and rivers".split()
  prompts = [head + " ".join(rng.choice(words, size=int(n))) for n in rng.integers(1, 30, 24)]
  ids = [sampling.encode_prompt(tok, p) for p in prompts]
  t, m = _left_padded(ids[:4])
  assert sampler_lib.shared_prefix_len(t, m) >= 32
  before = sampling.compile_count()
  kw = dict(fmt="raw", max_new_tokens=5, batch_size=4, stop=[], greedy=True, progress=False)
  shared = sampling.generate(cfg, params, tok, prompts, **kw)
  # The header's KV once; prefills of 1 and 4 rows at a few widths; one decode block.
  from cai_jax.sampling import engine
  Lp = engine.common_prefix_len(ids)
  assert Lp >= 32
  widths = {sampling.bucket_length(len(x) - Lp) for x in ids}
  assert 2 <= sampling.compile_count() - before <= 2 + 2 * len(widths) + 1
  monkeypatch.setattr(sampler_lib, "MIN_SHARED_PREFIX", 10 ** 9)
  plain = sampling.generate(cfg, params, tok, prompts, **kw)
  for a, b in zip(shared, plain):
    np.testing.assert_array_equal(a.tokens, b.tokens)


def test_top_k_and_top_p_restrict_the_support(tiny):
  cfg, params = tiny
  t, m = _left_padded(PROMPTS)
  out = sampling.sample(cfg, params, t, m, jax.random.PRNGKey(2), max_new_tokens=10,
                        eos_ids=(), top_k=3)
  ranks = _ranks(cfg, params, out.tokens_BxN)
  assert ranks.max() < 3
  out = sampling.sample(cfg, params, t, m, jax.random.PRNGKey(2), max_new_tokens=10,
                        eos_ids=(), top_p=0.3)
  seqs = [list(p) + list(g) for p, g in zip(PROMPTS, out.tokens_BxN)]
  tt, mm = _left_padded(seqs)
  probs = np.asarray(jax.nn.softmax(models.logits(cfg, params, jnp.asarray(tt),
                                                  jnp.asarray(mm)), -1))
  L = tt.shape[1]
  for i in range(len(PROMPTS)):
    for s in range(10):
      p = probs[i, L - 10 - 1 + s]
      tok = out.tokens_BxN[i, s]
      # The nucleus keeps a token only if the mass strictly above it is below top_p.
      assert p[p > p[tok]].sum() < 0.3 + 1e-6


def _ranks(cfg, params, gens):
  seqs = [list(p) + list(g) for p, g in zip(PROMPTS, gens)]
  t, m = _left_padded(seqs)
  lg = np.asarray(models.logits(cfg, params, jnp.asarray(t), jnp.asarray(m)))
  n = gens.shape[1]
  L = t.shape[1]
  out = np.zeros(gens.shape, np.int64)
  for i in range(len(gens)):
    for s in range(n):
      row = lg[i, L - n - 1 + s]
      out[i, s] = (row > row[gens[i, s]]).sum()
  return out


def test_inverse_cdf_and_nucleus_helpers():
  rng = np.random.default_rng(0)
  w = rng.exponential(size=(700,)).astype(np.float32) ** 3
  w[[3, 300, 650]] = 0.0
  n = 20000
  toks = np.asarray(sampler_lib._inverse_cdf(jnp.asarray(np.tile(w[:, None], (1, n))),
                                             sampler_lib.row_keys(jax.random.PRNGKey(0),
                                                                  jnp.arange(n))))
  freq = np.bincount(toks, minlength=700) / n
  assert freq[[3, 300, 650]].sum() == 0
  np.testing.assert_allclose(freq, w / w.sum(), atol=0.012)
  kept = np.asarray(sampler_lib._nucleus(jnp.asarray(w[:, None]), 0.5))[:, 0]
  order = np.argsort(-w)
  cum = np.cumsum(w[order]) / w.sum()
  k = int(np.searchsorted(cum, 0.5 - 1e-7)) + 1
  expect = np.zeros_like(w)
  expect[order[:k]] = w[order[:k]]
  np.testing.assert_array_equal(kept, expect)


def test_eos_stops_row_and_pads(tiny):
  cfg, params = tiny
  t, m = _left_padded(PROMPTS)
  free = sampling.sample(cfg, params, t, m, jax.random.PRNGKey(0), max_new_tokens=16,
                         greedy=True, eos_ids=())
  eos = int(free.tokens_BxN[1, 4])
  out = sampling.sample(cfg, params, t, m, jax.random.PRNGKey(0), max_new_tokens=16,
                        greedy=True, eos_ids=(eos,), pad_id=0)
  for i in range(len(PROMPTS)):
    hits = np.nonzero(free.tokens_BxN[i] == eos)[0]
    if len(hits):
      n = hits[0] + 1
      assert out.finished_B[i] and out.lengths_B[i] == n
      np.testing.assert_array_equal(out.tokens_BxN[i, :n], free.tokens_BxN[i, :n])
      assert (out.tokens_BxN[i, n:] == 0).all() and (out.logprobs_BxN[i, n:] == 0).all()
    else:
      assert not out.finished_B[i] and out.lengths_B[i] == 16
  assert out.finished_B[1]


def test_stop_token_sequences(tiny):
  cfg, params = tiny
  t, m = _left_padded(PROMPTS)
  free = sampling.sample(cfg, params, t, m, jax.random.PRNGKey(0), max_new_tokens=16,
                         greedy=True, eos_ids=())
  stop = [int(x) for x in free.tokens_BxN[3, 5:7]]
  out = sampling.sample(cfg, params, t, m, jax.random.PRNGKey(0), max_new_tokens=16,
                        greedy=True, eos_ids=(), stop_seqs=[stop], pad_id=0)
  row = list(free.tokens_BxN[3])
  first = next(k for k in range(1, 16) if row[k - 1:k + 1] == stop) + 1
  assert out.lengths_B[3] == first and out.finished_B[3]
  assert (out.tokens_BxN[3, first:] == 0).all()


def test_stop_automaton_is_exact_on_bytes(tiny_text):
  """The table fires at the first token whose decoded prefix contains a stop string,
  however the string was split into tokens."""
  cfg, _, tok = tiny_text
  stops = ["\n\nHuman:", "ing the", "<|im_end|>"]
  matcher = stops_lib.from_strings(tok, stops, cfg.vocab_size)
  pieces = ["Tell", " me", "\n", "\n", "Human", ":", " hi", "\n\n", "Hum", "an:", " see",
            "ing", " the", " go", "ings", " then", "<|im_end|>", "x"]
  ids = [i for p in pieces for i in tok(p, add_special_tokens=False)["input_ids"]]
  rng = np.random.default_rng(0)
  for trial in range(40):
    seq = list(rng.permutation(ids))[:12] if trial else ids
    state, fired = 0, None
    for k, t in enumerate(seq):
      state = int(matcher.next_SxV[state, t])
      if state < 0:
        fired = k
        break
    truth = None
    for k in range(len(seq)):
      text = tok.decode(seq[:k + 1], skip_special_tokens=False)
      if any(s in text for s in stops):
        truth = k
        break
    assert fired == truth, (seq, fired, truth)


def test_generate_never_returns_stop_strings(tiny_text):
  cfg, params, tok = tiny_text
  prompts = ["Once upon a time", [{"role": "user", "content": "Name a colour."}],
             "The quick brown fox"]
  free = sampling.generate(cfg, params, tok, prompts, fmt="chat", max_new_tokens=24, seed=1,
                           stop=[], eos_ids=(), progress=False)
  # Stop strings that certainly occur: pieces of the free-running texts that
  # straddle token boundaries.
  stops = [free[0].text[3:9], free[2].text[10:14]]
  assert all(stops)
  out = sampling.generate(cfg, params, tok, prompts, fmt="chat", max_new_tokens=24, seed=1,
                          stop=stops, eos_ids=(), progress=False)
  for f, c in zip(free, out):
    assert not any(s in c.text for s in stops)
    n = len(c.tokens)
    np.testing.assert_array_equal(c.tokens, f.tokens[:n])
    full = tok.decode(c.tokens.tolist(), skip_special_tokens=False)
    if c.finish_reason == "stop":
      assert any(s in full for s in stops)
      assert not any(s in tok.decode(c.tokens[:-1].tolist()) for s in stops)
      assert full.startswith(c.text) and n < 24
    else:
      assert c.finish_reason == "length" and n == 24
  assert out[0].finish_reason == "stop" and out[2].finish_reason == "stop"
  again = sampling.generate(cfg, params, tok, prompts, fmt="chat", max_new_tokens=24, seed=1,
                            stop=stops, eos_ids=(), progress=False)
  assert [c.text for c in again] == [c.text for c in out]


def test_score_matches_forward(tiny_text):
  cfg, params, tok = tiny_text
  prompts = ["Hello there", "A much longer prompt about the weather in the mountains", "x"]
  conts = [" general", " and what it does to the rivers in spring.", " y z"]
  lps = sampling.score(cfg, params, tok, prompts, conts, batch_size=2)
  p_ids = [sampling.encode_prompt(tok, p) for p in prompts]
  c_ids = [tok(c, add_special_tokens=False)["input_ids"] for c in conts]
  ref = _full_logprobs(cfg, params, p_ids, c_ids)
  for a, b, c in zip(lps, ref, c_ids):
    assert a.shape == (len(c),)
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_sharded_matches_single_device(tiny):
  cfg, params = tiny
  assert jax.device_count() == 8
  mesh = sharding.make_mesh((4, 1, 2))
  sp = sharding.shard_params(params, cfg, mesh)
  assert not sp["layers_0"]["attn"]["q_kernel"].sharding.is_fully_replicated
  rows = PROMPTS * 2
  t, m = _left_padded(rows)
  for kw in (dict(greedy=True), dict(temperature=0.9, top_k=40)):
    one = sampling.sample(cfg, params, t, m, jax.random.PRNGKey(7), max_new_tokens=10,
                          eos_ids=(3,), **kw)
    many = sampling.sample(cfg, sp, t, m, jax.random.PRNGKey(7), max_new_tokens=10,
                           eos_ids=(3,), mesh=mesh, **kw)
    np.testing.assert_array_equal(one.tokens_BxN, many.tokens_BxN)
    np.testing.assert_allclose(one.logprobs_BxN, many.logprobs_BxN, atol=1e-5)
    np.testing.assert_array_equal(one.lengths_B, many.lengths_B)
  # A prefix shared by the batch: batch-sharded rows read one replicated prefix KV.
  t, m = _left_padded(PREFIXED * 2)
  one = sampling.sample(cfg, params, t, m, 3, max_new_tokens=8, temperature=0.9, eos_ids=())
  many = sampling.sample(cfg, sp, t, m, 3, max_new_tokens=8, temperature=0.9, eos_ids=(),
                         mesh=mesh)
  np.testing.assert_array_equal(one.tokens_BxN, many.tokens_BxN)
  np.testing.assert_allclose(one.logprobs_BxN, many.logprobs_BxN, atol=1e-5)
  c_ids = [[1, 2, 3], [4], [5, 6], [7, 8, 9, 10]] * 2
  a = sampling.score_tokens(cfg, params, rows, c_ids, batch_size=8)
  b = sampling.score_tokens(cfg, sp, rows, c_ids, batch_size=8, mesh=mesh)
  for x, y in zip(a, b):
    np.testing.assert_allclose(x, y, atol=1e-5)


def test_generate_compiles_a_bounded_number_of_programs(tiny_text):
  cfg, params, tok = tiny_text
  rng = np.random.default_rng(0)
  words = "the cat sat on a mat while rain fell over quiet hills and rivers".split()
  prompts = [" ".join(rng.choice(words, size=int(n))) for n in rng.integers(1, 300, size=200)]
  before = sampling.compile_count()
  comps = sampling.generate(cfg, params, tok, prompts, fmt="raw", max_new_tokens=3,
                            batch_size=16, stop=[], progress=False)
  compiles = sampling.compile_count() - before
  assert len(comps) == 200 and all(len(c.tokens) >= 1 for c in comps)
  longest = max(len(sampling.encode_prompt(tok, p)) for p in prompts)
  widths = {sampling.bucket_length(n) for n in range(1, longest + 1)}
  assert 1 <= compiles <= 3 * len(widths) + 1, compiles
  assert [len(c.prompt_tokens) for c in comps] == [len(sampling.encode_prompt(tok, p))
                                                   for p in prompts]


def test_score_calls_run_at_a_fitted_batch_size():
  from cai_jax.sampling import api
  assert [api.fit_batch_size(n, 16) for n in (1, 3, 5, 8, 9, 16, 17, 200)] == \
      [1, 4, 8, 8, 16, 16, 16, 16]
  assert api.fit_batch_size(3, 16, divisor=8) == 8 and api.fit_batch_size(5, 12, 4) == 8


def test_sampled_rows_do_not_depend_on_batch_padding(tiny_text):
  """Each row draws from its own key: padding the batch to more rows (a bigger
  fitted batch, a mesh's batch divisor) leaves every real row's sample unchanged."""
  cfg, params, tok = tiny_text
  rows = [tok.encode(t) for t in ("the cat sat", "on a mat", "rain fell")]
  P = max(len(r) for r in rows)
  outs = []
  for B in (3, 4, 16):
    t = np.zeros((B, P), np.int32)
    m = np.zeros((B, P), bool)
    m[:, -1] = True
    for i, r in enumerate(rows):
      t[i, P - len(r):], m[i, P - len(r):] = r, True
    o = sampling.sample(cfg, params, t, m, 7, max_new_tokens=6, eos_ids=(-1,))
    outs.append((o.tokens_BxN[:3], o.logprobs_BxN[:3]))
  for toks, lps in outs[1:]:
    np.testing.assert_array_equal(toks, outs[0][0])
    np.testing.assert_allclose(lps, outs[0][1], atol=1e-5)


def test_program_choice(tiny, monkeypatch):
  """The CPU backend's choice: feature-major decoding without a mesh at any
  batch size; on a mesh, batches of at most FEW_ROWS rows per CPU device get
  the few-rows XLA options; nothing with the switch off. All three programs
  sample the same tokens with the same log-probs."""
  n = cpu_backend.FEW_ROWS
  few = cpu_backend.FEW_ROWS_COMPILER_OPTIONS
  assert cpu_backend.decode_program(None, n) == (True, None)
  assert cpu_backend.decode_program(None, n, scan_layers=True) == (False, few)
  mesh = sharding.make_mesh((4, 1, 2))
  assert cpu_backend.decode_program(mesh, n) == (False, few)
  assert cpu_backend.decode_program(mesh, n + 1) == (False, None)
  monkeypatch.setenv("CAI_JAX_CPU_BACKEND", "0")
  assert cpu_backend.decode_program(None, n) == (False, None)
  assert cpu_backend.decode_program(mesh, n) == (False, None)
  monkeypatch.delenv("CAI_JAX_CPU_BACKEND")
  cfg, params = tiny
  t, m = _left_padded(PROMPTS)
  outs = []
  for program in PROGRAMS:
    with pytest.MonkeyPatch.context() as mp:
      _use_program(mp, program, len(PROMPTS))
      outs.append(sampling.sample(cfg, params, t, m, jax.random.PRNGKey(2), max_new_tokens=12,
                                  temperature=0.8, eos_ids=()))
  for o in outs[1:]:
    np.testing.assert_array_equal(o.tokens_BxN, outs[0].tokens_BxN)
    np.testing.assert_allclose(o.logprobs_BxN, outs[0].logprobs_BxN, atol=1e-5)


def test_sample_defaults_to_feature_major_decoding_on_cpu(tiny):
  """Without a mesh on CPU, `sample` decodes feature-major; its decode weights
  are built once per params and rebuilt for new ones."""
  assert cpu_backend.FEATURE_MAJOR_DECODE
  cfg, params = tiny
  t, m = _left_padded(PROMPTS)
  sampler_lib._decode_weights.entries.clear()
  sampling.sample(cfg, params, t, m, 0, max_new_tokens=3, eos_ids=())
  assert _used_decode_weights(params)
  memo = sampler_lib._decode_weights
  first = list(memo.entries.values())[0][1]
  sampling.sample(cfg, params, t, m, 1, max_new_tokens=3, eos_ids=())
  assert list(memo.entries.values())[0][1] is first  # reused, not rebuilt
  params2 = jax.tree_util.tree_map(lambda x: x * 1.0, params)
  sampling.sample(cfg, params2, t, m, 0, max_new_tokens=3, eos_ids=())
  assert _used_decode_weights(params2) and len(memo.entries) == 1
  w2 = list(memo.entries.values())[0][1]
  np.testing.assert_array_equal(np.asarray(w2[0]["qkv"]), np.asarray(first[0]["qkv"]))


@pytest.mark.parametrize("variant", ["qkv_bias", "gemma", "bfloat16"])
def test_decode_step_matches_the_model(variant):
  """`decode.decode_step` equals `Transformer` with a KV cache at T = 1 (hidden
  states and cache), for model options the tiny default does not use."""
  from cai_jax.models import decode
  kw = dict(qkv_bias=dict(qkv_bias=True),
            gemma=dict(activation="gelu_tanh", norm_plus_one=True, scale_embeddings=True,
                       tie_embeddings=True),
            bfloat16=dict(dtype="bfloat16"))[variant]
  cfg = models.tiny().replace(**kw)
  params = models.init_params(cfg, jax.random.PRNGKey(4))
  params = jax.tree_util.tree_map(lambda x: x + 0.05 * jnp.ones_like(x), params)
  B, P = 3, 5
  t = jax.random.randint(jax.random.PRNGKey(5), (B, P), 1, cfg.vocab_size)
  mask = jnp.ones((B, P + 1), bool).at[0, :2].set(False)
  pos = jnp.maximum(jnp.cumsum(mask[:, :P], 1) - 1, 0)
  pre = models.forward(cfg, params, t, pos, mask, cache=models.init_cache(cfg, B, P + 1),
                       cache_index=0, heads=())
  tok = jnp.array([7, 8, 9])
  pos_B = mask[:, :P].sum(1)
  ref = models.forward(cfg, params, tok[:, None], pos_B[:, None], mask, cache=pre["cache"],
                       cache_index=P, last_only=True, heads=())
  h_DxB, cache = jax.jit(decode.decode_step, static_argnums=0)(
      cfg, decode.decode_weights(cfg, params), params, tok, pos_B, mask, pre["cache"], P)
  tol = 2e-2 if variant == "bfloat16" else 1e-5
  np.testing.assert_allclose(np.asarray(h_DxB.T, np.float32),
                             np.asarray(ref["hidden"][:, 0], np.float32), atol=tol, rtol=tol)
  for c, r in zip(cache, ref["cache"]):
    for n in ("k", "v"):
      np.testing.assert_allclose(np.asarray(c[n], np.float32), np.asarray(r[n], np.float32),
                                 atol=tol, rtol=tol)


def test_choose_buckets_limits_distinct_lengths():
  needs = [3, 40, 70, 100, 130, 200, 300, 500, 900, 1500]
  got = sampling.choose_buckets(needs, 4)
  assert len(set(got)) <= 4
  assert all(g >= n for g, n in zip(got, needs))
  assert got == sorted(got)


def test_prompt_too_long(tiny_text, caplog):
  cfg, params, tok = tiny_text
  cfg = cfg.replace(max_position_embeddings=64)
  long = "word " * 100
  with pytest.raises(sampling.PromptTooLongError, match="truncate_long_prompts"):
    sampling.generate(cfg, params, tok, [long, "hi"], fmt="raw", max_new_tokens=8,
                      progress=False)
  with caplog.at_level(logging.WARNING):
    out = sampling.generate(cfg, params, tok, [long, "hi"], fmt="raw", max_new_tokens=8,
                            progress=False, truncate_long_prompts=True)
  assert "keeping its last 56" in caplog.text
  ids = sampling.encode_prompt(tok, long)
  np.testing.assert_array_equal(out[0].prompt_tokens, ids[-56:])
  t, m = _left_padded([ids])
  with pytest.raises(sampling.PromptTooLongError):
    sampling.sample(cfg, params, t, m, 0, max_new_tokens=8)


def test_bad_mask_is_rejected(tiny):
  cfg, params = tiny
  with pytest.raises(sampling.sampler.InputError, match="left-padded"):
    sampling.sample(cfg, params, np.ones((1, 4), np.int32), np.array([[1, 0, 1, 1]]), 0,
                    max_new_tokens=2)


@pytest.mark.slow
@pytest.mark.parametrize("program", PROGRAMS)
def test_smollm2_greedy_and_logprobs(smollm2, program, monkeypatch):
  cfg, params, tok = smollm2
  _use_program(monkeypatch, program, 2)
  sampler_lib._decode_weights.entries.clear()
  msgs = [[{"role": "user", "content": "What is the capital of France?"}],
          [{"role": "user", "content": "Write one word."}]]
  prompts = [sampling.encode_prompt(tok, tok.apply_chat_template(m, tokenize=False,
                                                                 add_generation_prompt=True))
             for m in msgs]
  t, m = _left_padded(prompts, pad=cfg.pad_token_id)
  packed = []
  orig = sampler_lib.pack_prompts
  monkeypatch.setattr(sampler_lib, "pack_prompts",
                      lambda *a: packed.append(orig(*a)) or packed[-1])
  out = sampling.sample(cfg, params, t, m, 0, max_new_tokens=10, greedy=True, eos_ids=())
  assert len(packed) == 1 and packed[0] is not None  # the prefill ran packed
  assert _used_decode_weights(params) == (program == "feature_major")
  ref = _greedy_reference(cfg, params, prompts, 10)
  np.testing.assert_array_equal(out.tokens_BxN, ref)
  lp = _full_logprobs(cfg, params, prompts, list(ref))
  np.testing.assert_allclose(out.logprobs_BxN, np.stack(lp), atol=1e-4)
  assert "Paris" in tok.decode(out.tokens_BxN[0])


@pytest.mark.slow
def test_smollm2_generate_stops_at_end_of_turn(smollm2):
  cfg, params, tok = smollm2
  msgs = [[{"role": "user", "content": "Say hello."}],
          [{"role": "user", "content": "What is 2+2? Answer with a number."}]]
  comps = sampling.generate(cfg, params, tok, msgs, fmt="chat", max_new_tokens=48, seed=0,
                            temperature=0.7, batch_size=2, progress=False)
  assert any(c.finish_reason == "eos" for c in comps)
  for c in comps:
    assert "<|im_end|>" not in c.text and c.text.strip()
  prompts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
             for m in msgs]
  cont = [tok.decode(c.tokens.tolist(), skip_special_tokens=False) for c in comps]
  lps = sampling.score(cfg, params, tok, prompts, cont, batch_size=2)
  for c, lp in zip(comps, lps):
    if len(lp) == len(c.logprobs):  # same tokenisation of the decoded text
      np.testing.assert_allclose(lp, c.logprobs, atol=1e-4)
