"""Continuous batching (`sampling.engine`): the static sampler's tokens for the
same keys, whatever the slots, refill groups and shards; bounded compilation;
the prefix KV kept across calls."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax import sampling, sharding
from cai_jax.sampling import engine
from cai_jax.sampling import sampler as sampler_lib


@pytest.fixture(scope="module")
def tiny(peaked_tiny):
  return peaked_tiny


def _prompts(seed: int, n: int, head: int = 24, longest: int = 30):
  """n prompts of mixed lengths; all but the last two start with one `head`-token header."""
  rng = np.random.default_rng(seed)
  h = [int(x) for x in rng.integers(3, 250, head)]
  out = [h + [int(x) for x in rng.integers(3, 250, rng.integers(1, longest))]
         for _ in range(n - 2)]
  return out + [[int(rng.integers(3, 250))], [int(x) for x in rng.integers(3, 250, 5)]]


def _assert_same(out, ref, atol=1e-5):
  np.testing.assert_array_equal(out.lengths_B, ref.lengths_B)
  np.testing.assert_array_equal(out.finished_B, ref.finished_B)
  np.testing.assert_array_equal(out.tokens_BxN, ref.tokens_BxN)
  np.testing.assert_allclose(out.logprobs_BxN, ref.logprobs_BxN, atol=atol)


def test_greedy_equals_static_token_for_token(tiny):
  """Rows stopping at their first token (EOS), on a stop sequence, and at the
  budget; any number of slots (1: every row waits for a refill) and blocks."""
  cfg, params = tiny
  prompts = _prompts(0, 11)
  t, m = sampling.left_pad(prompts)
  free = sampler_lib.sample(cfg, params, t, m, 0, max_new_tokens=12, greedy=True, eos_ids=())
  eos = int(free.tokens_BxN[3, 0])
  stop = [[int(x) for x in free.tokens_BxN[6, 2:4]]]
  kw = dict(max_new_tokens=12, greedy=True, eos_ids=(eos,), stop_seqs=stop)
  ref = sampler_lib.sample(cfg, params, t, m, 0, **kw)
  assert ref.lengths_B.min() == 1 and (ref.lengths_B == 12).any() and ref.finished_B.any()
  assert ref.lengths_B[6] <= 4 and ref.finished_B[6]
  for slots, block in ((1, 8), (3, 1), (4, 5), (16, 8)):
    _assert_same(engine.generate_tokens(cfg, params, prompts, 0, slots=slots, block=block, **kw),
                 ref)


@pytest.mark.parametrize("kw", [dict(temperature=1.0), dict(temperature=0.7, top_k=20),
                                dict(temperature=1.3, top_p=0.8)])
def test_sampled_equals_static_for_the_same_seed(tiny, kw):
  cfg, params = tiny
  prompts = _prompts(1, 13)
  t, m = sampling.left_pad(prompts)
  free = sampler_lib.sample(cfg, params, t, m, jax.random.PRNGKey(9), max_new_tokens=10,
                            eos_ids=(), **kw)
  eos = (int(free.tokens_BxN[0, 4]), int(free.tokens_BxN[5, 2]))
  ref = sampler_lib.sample(cfg, params, t, m, jax.random.PRNGKey(9), max_new_tokens=10,
                           eos_ids=eos, **kw)
  assert ref.lengths_B.min() < 10 and (ref.lengths_B == 10).any()
  for slots in (4, 16):
    out = engine.generate_tokens(cfg, params, prompts, jax.random.PRNGKey(9), slots=slots,
                                 block=3, max_new_tokens=10, eos_ids=eos, **kw)
    _assert_same(out, ref)
  # A row's sample depends on its key alone: reversed prompts with reversed keys.
  keys = sampler_lib.row_keys(jax.random.PRNGKey(9), jnp.arange(len(prompts)))
  rev = engine.generate_tokens(cfg, params, prompts[::-1], keys[::-1], slots=4,
                               max_new_tokens=10, eos_ids=eos, **kw)
  np.testing.assert_array_equal(rev.tokens_BxN[::-1], ref.tokens_BxN)


def test_budget_per_prompt(tiny):
  cfg, params = tiny
  prompts = _prompts(2, 6)
  budgets = [1, 4, 9, 2, 9, 5]
  t, m = sampling.left_pad(prompts)
  ref = sampler_lib.sample(cfg, params, t, m, 3, max_new_tokens=9, eos_ids=())
  out = engine.generate_tokens(cfg, params, prompts, 3, slots=2, max_new_tokens=budgets,
                               eos_ids=())
  np.testing.assert_array_equal(out.lengths_B, budgets)
  for i, b in enumerate(budgets):
    np.testing.assert_array_equal(out.tokens_BxN[i, :b], ref.tokens_BxN[i, :b])


def test_admission_groups():
  """Refills take the largest group size the waiting prompts fill; a call
  whose prompts all fit prefills them in one group, idle slots making up the
  size; a group whose width pads short prompts to a long one's is split."""
  sizes = engine.group_sizes(8)
  assert sizes == [1, 4, 8]
  even = lambda n: [100] * n  # noqa: E731  (width 128: 78% filled)
  assert engine.admit_size(sizes, even(5), 8) == 8     # one prefill, 3 idle slots
  assert engine.admit_size(sizes, even(1), 8) == 1
  assert engine.admit_size(sizes, even(3), 5) == 4     # 3 prompts, one idle slot
  assert engine.admit_size(sizes, even(5), 6) == 4     # 8 does not fit: 4, then 1
  assert engine.admit_size(sizes, even(20), 8) == 8
  assert engine.admit_size(sizes, even(20), 3) == 1
  # Longest first: 700 sets the width to 1024, where the others need 512.
  assert engine.admit_size(sizes, [700] + [300] * 7, 8) == 1
  assert engine.admit_size(sizes, [300] * 7 + [700], 8) == 4  # 300s, then 300 + 700 alone
  assert engine.admit_size(sizes, [300] * 8, 8) == 8
  assert engine.prefill_width(300) == 512 and engine.prefill_width(5) == 128


def test_attention_window():
  """A decode block reads the smallest of line, line/2, line/4 that holds the
  live rows' writes, never below MIN_WINDOW."""
  assert engine.window_for(2048, 1025) == 2048
  assert engine.window_for(2048, 1024) == 1024
  assert engine.window_for(2048, 100) == engine.MIN_WINDOW == 512
  assert engine.window_for(4096, 600) == 1024  # two halvings at most
  assert engine.window_for(512, 10) == 512


@pytest.mark.parametrize("kw", [dict(greedy=True), dict(temperature=1.0, top_k=20)])
def test_attention_windows_keep_the_static_tokens(tiny, monkeypatch, kw):
  """With small windows allowed, blocks run on part of the lines (growing as
  rows lengthen) and the tokens stay the static sampler's."""
  cfg, params = tiny
  monkeypatch.setattr(engine, "MIN_WINDOW", 8)
  monkeypatch.setattr(engine, "MIN_PREFILL_WIDTH", 8)
  used = []
  window_for = engine.window_for
  monkeypatch.setattr(engine, "window_for", lambda line, need: used.append(
      (line, window_for(line, need))) or used[-1][1])
  prompts = _prompts(0, 11)
  t, m = sampling.left_pad(prompts)
  args = dict(max_new_tokens=12, eos_ids=(), **kw)
  ref = sampler_lib.sample(cfg, params, t, m, jax.random.PRNGKey(3), **args)
  keys = sampler_lib.row_keys(jax.random.PRNGKey(3), jnp.arange(len(prompts)))
  for slots in (3, 16):
    _assert_same(engine.generate_tokens(cfg, params, prompts, keys, slots=slots, block=4,
                                        **args), ref)
  windows = {w for _, w in used}
  assert len(windows) >= 2 and max(windows) < 128, used  # grew, on lines of 128


def test_compilations_are_bounded_by_the_grids_not_the_prompt_count(tiny):
  """Two calls, of 12 and of 48 prompts from the same length range: the
  programs compiled stay within (group sizes) x (prompt widths) prefills and
  one decode block per line length (and per halved slot count)."""
  cfg, params = tiny
  rng = np.random.default_rng(4)
  calls = [[[int(x) for x in rng.integers(3, 250, rng.integers(1, 60))] for _ in range(n)]
           for n in (12, 48)]
  before = dict(sampler_lib.TRACE_COUNTS)
  for prompts in calls:
    out = engine.generate_tokens(cfg, params, prompts, 0, slots=8, max_new_tokens=3,
                                 eos_ids=(5,))
    assert len(out.lengths_B) == len(prompts) and (out.lengths_B >= 1).all()
  new = {k: sampler_lib.TRACE_COUNTS[k] - before.get(k, 0) for k in ("engine_admit",
                                                                     "engine_decode")}
  widths = {engine.prefill_width(n) for n in range(1, 60)}
  # Each group shape compiles unpacked, and packed at one token count.
  assert 1 <= new["engine_admit"] <= 2 * len(engine.group_sizes(8)) * len(widths), new
  assert new["engine_decode"] <= 2, new  # 8 slots (MIN_SLOTS: no halving), per line length
  # The larger call added at most what the grids allow beyond the smaller one.
  before2 = dict(sampler_lib.TRACE_COUNTS)
  engine.generate_tokens(cfg, params, calls[1][::-1], 1, slots=8, max_new_tokens=3, eos_ids=(5,))
  assert sampler_lib.TRACE_COUNTS["engine_decode"] == before2["engine_decode"]


def test_prefix_kv_is_kept_across_calls(tiny):
  """A header shared by a call's prompts is computed once per (params,
  header) and reused by later calls and by the static sampler; the outputs
  equal recomputing it with every row."""
  cfg, params = tiny
  memo = sampler_lib.prefix_kv
  memo.entries.clear()
  first, second = _prompts(5, 9)[:-2], _prompts(5, 12)[:-2]
  assert engine.common_prefix_len(first) == engine.common_prefix_len(second) == 24
  misses = memo.misses
  a = engine.generate_tokens(cfg, params, first, 0, slots=4, max_new_tokens=6, greedy=True,
                             eos_ids=())
  assert memo.misses == misses + 1
  b = engine.generate_tokens(cfg, params, second, 1, slots=4, max_new_tokens=6, eos_ids=())
  t, m = sampling.left_pad(second)
  c = sampler_lib.sample(cfg, params, t, m, 1, max_new_tokens=6, eos_ids=())
  assert memo.misses == misses + 1  # the second call and the static sampler reused it
  _assert_same(b, c)
  for prompts, out, kw in ((first, a, dict(greedy=True)), (second, b, {})):
    again = engine.generate_tokens(cfg, params, prompts, int(out is b), slots=4,
                                   max_new_tokens=6, eos_ids=(), share_prefix=False, **kw)
    _assert_same(again, out)
  # New params (a training step) miss: the memo never serves stale KV.
  params2 = jax.tree_util.tree_map(lambda x: x * 1.0, params)
  engine.generate_tokens(cfg, params2, first, 0, slots=4, max_new_tokens=2, eos_ids=())
  assert memo.misses == misses + 2


def test_sharded_engine_equals_single_device(tiny):
  cfg, params = tiny
  mesh = sharding.make_mesh((4, 1, 2))
  sp = sharding.shard_params(params, cfg, mesh)
  # With a shared header (its KV replicated beside the sharded lines) and without.
  for prompts, kw in ((_prompts(6, 11)[:-2], dict(greedy=True)),
                      (_prompts(6, 11), dict(temperature=0.9))):
    one = engine.generate_tokens(cfg, params, prompts, 2, slots=4, max_new_tokens=8,
                                 eos_ids=(9,), **kw)
    many = engine.generate_tokens(cfg, sp, prompts, 2, slots=4, max_new_tokens=8,
                                  eos_ids=(9,), mesh=mesh, **kw)
    _assert_same(many, one)


def test_generate_does_not_depend_on_batch_size():
  """`sampling.generate`: a prompt's completion depends on its text and the
  seed, not on the slots or the other prompts of the call."""
  from cai_jax import roles
  cfg, params, tok = roles.load("tiny", seed=3)
  prompts = ["the cat sat", "on a mat", "rain fell over quiet hills", "and", "rivers ran"]
  runs = [sampling.generate(cfg, params, tok, prompts, fmt="raw", max_new_tokens=6, stop=[],
                            progress=False, batch_size=b, seed=4) for b in (1, 2, 16)]
  for r in runs[1:]:
    assert [c.tokens.tolist() for c in r] == [c.tokens.tolist() for c in runs[0]]
  keys = sampler_lib.row_keys(jax.random.PRNGKey(4), jnp.arange(5))
  sub = sampling.generate(cfg, params, tok, prompts[2:4], fmt="raw", max_new_tokens=6,
                          stop=[], progress=False, keys=keys[2:4])
  assert [c.tokens.tolist() for c in sub] == [c.tokens.tolist() for c in runs[0][2:4]]
