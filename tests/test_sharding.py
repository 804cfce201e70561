"""Sharded params and batches on 8 simulated CPU devices give single-device results."""
import jax
import numpy as np
import pytest

from cai_jax import models, sharding


@pytest.fixture(scope="module")
def tiny_setup():
  cfg = models.tiny(num_kv_heads=8)
  params = models.add_score_head(cfg, models.init_params(cfg, jax.random.PRNGKey(0)),
                                 jax.random.PRNGKey(1), init_std=0.5)
  rng = np.random.default_rng(0)
  toks = rng.integers(3, cfg.vocab_size, (8, 16))
  mask = np.ones((8, 16), bool)
  mask[1, :5] = False
  mask[6, :11] = False
  return cfg, params, toks, mask


def test_eight_devices():
  assert jax.device_count() == 8


@pytest.mark.parametrize("ici", [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 1, 8)])
def test_meshes_match_single_device(tiny_setup, ici):
  cfg, params, toks, mask = tiny_setup
  ref = np.asarray(models.logits(cfg, params, toks, mask))
  ref_r = np.asarray(models.reward(cfg, params, toks, mask))
  mesh = sharding.make_mesh(ici)
  p = sharding.shard_params(params, cfg, mesh)
  b = sharding.shard_batch({"t": toks, "m": mask}, mesh)
  out = np.asarray(models.logits(cfg, p, b["t"], b["m"]))
  np.testing.assert_allclose(out, ref, atol=1e-5)
  np.testing.assert_allclose(np.asarray(models.reward(cfg, p, b["t"], b["m"])), ref_r, atol=1e-5)
  # The parameters really are split across devices.
  data, fsdp, tensor = ici
  q = p["layers_0"]["attn"]["q_kernel"]  # [D=64, N=8, H=8] ('embed','heads','head_dim')
  emb = p["embedding"]                    # [V=512, D=64] ('vocab','embed')
  shard_q = q.addressable_shards[0].data.shape
  shard_e = emb.addressable_shards[0].data.shape
  assert shard_q == (64 // fsdp, 8 // tensor, 8)
  assert shard_e == (512 // tensor, 64 // fsdp)
  assert b["t"].addressable_shards[0].data.shape[0] == 8 // (data * fsdp)


def test_sharded_init_matches_plain_init():
  cfg = models.tiny()
  mesh = sharding.make_mesh((2, 2, 2))
  p = sharding.sharded_init(cfg, jax.random.PRNGKey(3), mesh, heads=("lm", "score"))
  ref = models.init_params(cfg, jax.random.PRNGKey(3), heads=("lm", "score"))
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, atol=1e-6),
                         p, ref)
  assert p["layers_1"]["mlp"]["up_kernel"].addressable_shards[0].data.shape == (32, 64)


def test_non_dividing_axis_is_replicated():
  cfg = models.tiny(num_heads=6, num_kv_heads=3, head_dim=8)  # 6 heads on tensor=4
  mesh = sharding.make_mesh((2, 1, 4))
  p = sharding.shard_params(models.init_params(cfg, jax.random.PRNGKey(0)), cfg, mesh)
  assert p["layers_0"]["attn"]["q_kernel"].addressable_shards[0].data.shape == (64, 6, 8)
  assert p["layers_0"]["mlp"]["gate_kernel"].addressable_shards[0].data.shape == (64, 32)


def test_mesh_shape_errors():
  assert sharding.mesh_shape((-1, 2, 1), 8) == (4, 2, 1)
  with pytest.raises(sharding.ShardingError):
    sharding.mesh_shape((3, -1, 1), 8)
  with pytest.raises(sharding.ShardingError):
    sharding.mesh_shape((-1, -1, 1), 8)
  with pytest.raises(sharding.ShardingError):
    sharding.mesh_shape((2, 2, 1), 8)
