"""Model parity with transformers (PyTorch) on random tiny configs, export, bad input."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax import models

import torch  # noqa: E402  (test extra: `make test` installs it)
import transformers  # noqa: E402

COMMON = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)

ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(rope_theta=5000.0)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=False)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(head_dim=16)),
    "llama_tied_mha": ("LlamaConfig", "LlamaForCausalLM",
                       dict(tie_word_embeddings=True, num_key_value_heads=8)),
}


def _hf_model(arch, seed=0):
  cname, mname, extra = ARCHS[arch]
  torch.manual_seed(seed)
  cfg = getattr(transformers, cname)(**{**COMMON, **extra})
  m = getattr(transformers, mname)(cfg).eval()
  with torch.no_grad():  # larger weights than the default init so errors show up
    for p in m.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  return m


def _batch(seed=0, B=4, L=13, V=320):
  rng = np.random.default_rng(seed)
  toks = rng.integers(3, V, (B, L))
  mask = np.ones((B, L), bool)
  for b, n in enumerate([0, 3, 6, 11][:B]):
    mask[b, :n] = False  # left padding
  toks[~mask] = 0
  return toks, mask


def _torch_logits(m, toks, mask):
  pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
  with torch.no_grad():
    return m(input_ids=torch.tensor(toks), attention_mask=torch.tensor(mask.astype(np.int64)),
             position_ids=torch.tensor(pos)).logits.float().numpy()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_import_parity_and_export_roundtrip(arch, tmp_path):
  m = _hf_model(arch)
  src = tmp_path / "hf"
  m.save_pretrained(src)
  cfg, params = models.load_pretrained(str(src))
  assert cfg.model_type == arch.split("_")[0]
  toks, mask = _batch()
  ref = _torch_logits(m, toks, mask)
  ours = np.asarray(models.logits(cfg, params, jnp.asarray(toks), jnp.asarray(mask)))
  assert ours.dtype == np.float32
  assert np.abs(ours - ref)[mask].max() < 1e-4

  out = tmp_path / "export"
  models.save_pretrained(cfg, params, str(out))
  m2 = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
  ref2 = _torch_logits(m2, toks, mask)
  assert np.abs(ref2 - ref)[mask].max() < 1e-4
  # And back into our params, bit for bit.
  cfg3, params3 = models.load_pretrained(str(out))
  assert cfg3 == cfg
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, params3)


@pytest.mark.parametrize("block", [4, 8])
def test_blocked_causal_attention_matches_hf_and_unblocked(block, tmp_path, monkeypatch):
  """Query blocks that skip the masked upper triangle: same logits as the
  reference and the same gradients as one unblocked block."""
  from cai_jax.models import transformer
  m = _hf_model("llama")
  m.save_pretrained(tmp_path / "hf")
  cfg, params = models.load_pretrained(str(tmp_path / "hf"))
  toks, mask = _batch(L=16)
  assert transformer._query_blocks(16) == 1  # default block: one block at this length
  monkeypatch.setattr(transformer, "ATTN_QUERY_BLOCK", block)
  assert transformer._query_blocks(16) == 16 // block
  pos = models.positions_from_mask(jnp.asarray(mask))

  def fwd(p):  # not jitted: models.logits would cache the trace across block sizes
    return models.forward(cfg, p, jnp.asarray(toks), pos, jnp.asarray(mask), heads=("lm",))["logits"]
  ref = _torch_logits(m, toks, mask)
  ours = np.asarray(fwd(params))
  assert np.abs(ours - ref)[mask].max() < 1e-4

  def loss(p):
    lg = fwd(p)
    return jnp.sum(jnp.where(jnp.asarray(mask)[..., None], jax.nn.log_softmax(lg), 0.0)[..., 5])
  g_blocked = jax.grad(loss)(params)
  monkeypatch.setattr(transformer, "ATTN_QUERY_BLOCK", 10 ** 6)
  g_full = jax.grad(loss)(params)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4),
                         g_blocked, g_full)


def test_sharded_safetensors_and_bf16(tmp_path):
  m = _hf_model("llama", seed=1)
  src = tmp_path / "hf"
  m.save_pretrained(src, max_shard_size="100KB")
  assert (src / "model.safetensors.index.json").exists()
  cfg, params = models.load_pretrained(str(src))
  toks, mask = _batch(seed=1)
  ref = _torch_logits(m, toks, mask)
  ours = np.asarray(models.logits(cfg, params, toks, mask))
  assert np.abs(ours - ref)[mask].max() < 1e-4
  # bfloat16 compute runs and stays close; logits are still float32.
  cfg16, params16 = models.load_pretrained(str(src), dtype="bfloat16", param_dtype="bfloat16")
  out16 = np.asarray(models.logits(cfg16, params16, toks, mask))
  assert out16.dtype == np.float32
  assert np.abs(out16 - ref)[mask].max() < 0.25


def test_left_padding_invariance():
  cfg = models.tiny()
  params = models.init_params(cfg, jax.random.PRNGKey(0))
  toks = np.random.default_rng(0).integers(3, cfg.vocab_size, (1, 9))
  full = np.asarray(models.logits(cfg, params, toks, np.ones_like(toks, bool)))
  padded = np.concatenate([np.zeros((1, 5), toks.dtype), toks], 1)
  mask = np.concatenate([np.zeros((1, 5), bool), np.ones((1, 9), bool)], 1)
  out = np.asarray(models.logits(cfg, params, padded, mask))[:, 5:]
  np.testing.assert_allclose(out, full, atol=1e-5)


def test_kv_cache_matches_full_forward():
  cfg = models.tiny("qwen2")
  params = models.init_params(cfg, jax.random.PRNGKey(1))
  toks, mask = _batch(seed=2, V=cfg.vocab_size)
  full = np.asarray(models.logits(cfg, params, toks, mask))
  B, L = toks.shape
  P = 8
  cache = models.init_cache(cfg, B, L + 3)
  kv_mask = np.zeros((B, L + 3), bool)
  kv_mask[:, :P] = mask[:, :P]
  pos = np.asarray(models.positions_from_mask(mask))
  out = models.forward(cfg, params, toks[:, :P], pos[:, :P], kv_mask, cache=cache, cache_index=0)
  real = mask[:, :P]  # padded query positions are don't-care
  np.testing.assert_allclose(np.asarray(out["logits"])[real], full[:, :P][real], atol=1e-5)
  cache = out["cache"]
  for t in range(P, L):
    kv_mask[:, t] = mask[:, t]
    out = models.forward(cfg, params, toks[:, t:t + 1], pos[:, t:t + 1], kv_mask,
                         cache=cache, cache_index=t, last_only=True)
    cache = out["cache"]
    r = mask[:, t]
    np.testing.assert_allclose(np.asarray(out["logits"][:, 0])[r], full[:, t][r], atol=1e-5)


@pytest.mark.parametrize("remat", [False, True])
def test_scan_layers_matches_unrolled(remat):
  """The layer-stacked (nn.scan) layout computes the unrolled model's logits and
  gradients; its params have a leading layer axis named "layers"."""
  cfg = models.tiny("qwen2").replace(num_layers=3, remat=remat)
  scfg = cfg.replace(scan_layers=True)
  params = models.init_params(cfg, jax.random.PRNGKey(3))
  stacked = models.stack_layers(cfg, params)
  shapes, specs = models.abstract_params(scfg)
  assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(stacked)
  q = stacked["layers_stack"]["attn"]["q_kernel"]
  assert q.shape == (3,) + params["layers_0"]["attn"]["q_kernel"].shape
  assert tuple(specs["layers_stack"]["attn"]["q_kernel"])[0] == "layers"
  toks, mask = _batch(seed=4, V=cfg.vocab_size)
  want = np.asarray(models.logits(cfg, params, toks, mask))
  got = np.asarray(models.logits(scfg, stacked, toks, mask))
  np.testing.assert_allclose(got, want, atol=1e-5)

  def loss(c):
    return lambda p: jnp.mean(models.logits(c, p, toks, mask)[mask] ** 2)
  g_unrolled = jax.grad(loss(cfg))(params)
  g_scanned = models.unstack_layers(cfg, jax.grad(loss(scfg))(stacked))
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4),
                         g_scanned, g_unrolled)
  back = models.unstack_layers(cfg, stacked)
  jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)
  with pytest.raises(ValueError, match="unstack_layers"):
    models.forward(scfg, stacked, toks, np.zeros_like(toks), mask,
                   cache=models.init_cache(cfg, toks.shape[0], toks.shape[1]), cache_index=0)


def test_scalar_head_reads_last_real_token():
  cfg = models.tiny()
  params = models.add_score_head(cfg, models.init_params(cfg, jax.random.PRNGKey(0)),
                                 jax.random.PRNGKey(1), init_std=1.0)
  assert models.heads_of(cfg, params) == ("lm", "score")
  toks, mask = _batch(seed=3, V=cfg.vocab_size)
  right = np.zeros_like(mask)
  right[:, :7] = True  # right padding: last real token at index 6
  s = np.asarray(models.scores(cfg, params, toks, mask))
  r = np.asarray(models.reward(cfg, params, toks, mask))
  np.testing.assert_allclose(r, s[:, -1], atol=1e-6)
  r2 = np.asarray(models.reward(cfg, params, toks, right))
  s2 = np.asarray(models.scores(cfg, params, toks, right))
  np.testing.assert_allclose(r2, s2[:, 6], atol=1e-6)


@pytest.mark.parametrize("fn,published", [(models.llama2_7b, 6.74e9), (models.gemma_7b, 8.54e9),
                                          (models.llama3_8b, 8.03e9)])
def test_full_size_shapes_abstract(fn, published):
  cfg = fn()
  abstract, specs = models.abstract_params(cfg)
  n = models.count_params(abstract)
  assert abs(n - published) / published < 0.01
  assert n == cfg.num_params()
  assert abstract["layers_0"]["attn"]["q_kernel"].dtype == jnp.bfloat16
  assert tuple(specs["layers_0"]["mlp"]["gate_kernel"]) == ("embed", "mlp")


# ------------------------------------------------------------------ bad input
def _one_line(e):
  msg = str(e.value)
  assert "\n" not in msg and msg
  return msg


def test_bad_input_errors(tmp_path):
  with pytest.raises(models.CheckpointError) as e:
    models.load_pretrained(str(tmp_path / "nope"))
  assert "nope" in _one_line(e)

  m = _hf_model("llama")
  good = tmp_path / "good"
  m.save_pretrained(good)

  # unsupported model_type
  bad = tmp_path / "bad_type"
  bad.mkdir()
  cfg = json.loads((good / "config.json").read_text())
  (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
  os.link(good / "model.safetensors", bad / "model.safetensors")
  with pytest.raises(models.CheckpointError) as e:
    models.load_pretrained(str(bad))
  assert "gpt2" in _one_line(e) and "config.json" in str(e.value)

  # mismatched tensor shapes: config claims a wider FFN than the tensors
  shp = tmp_path / "bad_shape"
  shp.mkdir()
  (shp / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))
  os.link(good / "model.safetensors", shp / "model.safetensors")
  with pytest.raises(models.CheckpointError) as e:
    models.load_pretrained(str(shp))
  assert "gate_proj" in _one_line(e) and "shape" in str(e.value)

  # truncated safetensors
  tr = tmp_path / "truncated"
  tr.mkdir()
  (tr / "config.json").write_text(json.dumps(cfg))
  data = (good / "model.safetensors").read_bytes()
  (tr / "model.safetensors").write_bytes(data[: len(data) // 2])
  with pytest.raises(models.CheckpointError) as e:
    models.load_pretrained(str(tr))
  assert "model.safetensors" in _one_line(e) and "truncated" in str(e.value)

  # corrupt header / missing weights / corrupt config / corrupt gguf
  (tr / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json!!!!!!}")
  with pytest.raises(models.CheckpointError) as e:
    models.load_pretrained(str(tr))
  assert "corrupt" in _one_line(e)
  (tr / "model.safetensors").unlink()
  with pytest.raises(models.CheckpointError) as e:
    models.load_pretrained(str(tr))
  assert "safetensors" in _one_line(e)
  (tr / "config.json").write_text("{")
  with pytest.raises(models.CheckpointError) as e:
    models.load_pretrained(str(tr))
  assert "config.json" in _one_line(e)
  g = tmp_path / "x.gguf"
  g.write_bytes(b"GGUF" + b"\x00" * 20)
  with pytest.raises(models.CheckpointError) as e:
    models.load_pretrained(str(g))
  assert "x.gguf" in _one_line(e)


def test_stage_exports_in_the_configured_dtype(tmp_path):
  """config.export_dtype: a stage's HF export in that dtype ("" keeps the params')."""
  from cai_jax import pipeline, roles
  from cai_jax.runtime import StageContext
  from cai_jax.stages import sft
  cfg, params, tok = roles.load("tiny")
  for dtype, want in (("", "float32"), ("bfloat16", "bfloat16")):
    config = pipeline.base_config()
    config.export_dtype = dtype
    ctx = StageContext(config, str(tmp_path / (dtype or "default")), "sft", sft.default_config())
    out = ctx.export(cfg, params, tok)
    with open(os.path.join(out, "config.json")) as f:
      assert json.load(f)["torch_dtype"] == want
    m = transformers.AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert str(next(m.parameters()).dtype) == f"torch.{want}"


def test_score_head_per_axis_round_trips_through_transformers(tmp_path):
  """cfg.score_labels: one score per axis (BxA at the last token); the export loads as
  AutoModelForSequenceClassification with one label per axis, whose logits plus
  config.json's score_bias are our scores, and loads back with the same labels."""
  cfg = models.tiny(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=8,
                    score_labels=("harm", "ethics", "helpfulness"))
  params = models.add_score_head(cfg, models.init_params(cfg, jax.random.PRNGKey(0)),
                                 jax.random.PRNGKey(1), init_std=0.5)
  params["score_bias"] = jnp.asarray([0.25, -1.0, 2.0], jnp.float32)
  assert params["score_kernel"].shape == (32, 3)
  toks = np.random.default_rng(0).integers(3, 64, (3, 9)).astype(np.int32)
  mask = np.ones(toks.shape, bool)
  mask[0, 6:] = False  # a right-padded row: its score is read at its last real token
  ours = np.asarray(models.reward(cfg, params, toks, mask))
  assert ours.shape == (3, 3)
  single = np.asarray(models.reward(cfg, params, toks[:1, :6], mask[:1, :6]))
  np.testing.assert_allclose(ours[:1], single, atol=1e-5)
  out = str(tmp_path / "pm")
  models.save_pretrained(cfg, params, out, score_pad_id=0)
  hf = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
  assert hf.config.id2label == {0: "harm", 1: "ethics", 2: "helpfulness"}
  with torch.no_grad():
    theirs = hf(input_ids=torch.tensor(toks[1:], dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(theirs + np.asarray(hf.config.score_bias), ours[1:], atol=1e-5)
  cfg2, params2 = models.load_pretrained(out)
  assert cfg2.score_labels == cfg.score_labels
  np.testing.assert_array_equal(params2["score_kernel"], params["score_kernel"])
  np.testing.assert_array_equal(params2["score_bias"], params["score_bias"])
