"""LoRA: only the adapters train, the merged export is the adapted model in transformers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax import models, sharding as shd
from cai_jax.models import lora
from cai_jax.training import data, loop, objectives, optim
from cai_jax.training import state as state_lib

import torch  # noqa: E402  (test extra)
import transformers  # noqa: E402

CFG = models.tiny(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8, tie_embeddings=True)


def _adapted(seed=0, rank=4, targets=tuple(lora.TARGETS)):
  params = models.init_params(CFG, jax.random.PRNGKey(seed))
  p = lora.add(params, rank, 8.0, targets, jax.random.PRNGKey(seed + 1))
  # Non-zero B, so the adapters change the model.
  p["lora"] = jax.tree_util.tree_map_with_path(
      lambda path, x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(7), x.shape, x.dtype)
      if getattr(path[-1], "key", None) == "b" else x, p["lora"])
  return params, p


def _batch(seed=0, B=8, L=12):
  rng = np.random.default_rng(seed)
  ex = [data.SFTExample(rng.integers(3, 128, size=L).astype(np.int32), np.arange(L) >= 4)
        for _ in range(B)]
  return data.sft_batch(ex, [[i] for i in range(B)], L, pad_id=0)


def test_adapters_start_as_the_base_model_and_change_it():
  base = models.init_params(CFG, jax.random.PRNGKey(0))
  fresh = lora.add(base, 4, 8.0, ("q", "o", "down"), jax.random.PRNGKey(1))
  toks = jnp.asarray(np.random.default_rng(0).integers(3, 128, (2, 9)))
  np.testing.assert_array_equal(models.logits(CFG, fresh, toks), models.logits(CFG, base, toks))
  _, adapted = _adapted()
  assert float(jnp.abs(models.logits(CFG, adapted, toks) - models.logits(CFG, base, toks)).max()) > 1e-3
  assert lora.base(adapted).keys() == base.keys()
  # Only the chosen projections get adapters: A (in, r), B (r, out); o's input is (heads, dim).
  l0 = fresh["lora"]["layers_0"]
  assert set(l0["attn"]) == {"q_kernel", "o_kernel"} and set(l0["mlp"]) == {"down_kernel"}
  assert l0["attn"]["o_kernel"]["a"].shape == (4, 8, 4)
  with pytest.raises(ValueError, match="choose from"):
    lora.add(base, 4, 8.0, ("qkv",), jax.random.PRNGKey(1))


def test_only_the_adapters_train_and_hold_optimizer_state():
  _, params = _adapted()
  before = jax.device_get(params)  # the step donates the state
  mesh = shd.make_mesh((1, 8, 1), devices=jax.devices()[:8])
  trainable = lora.trainable_mask(params)
  tx = optim.make_optimizer(optim.default_optim_config(), trainable=trainable)
  st = state_lib.create_train_state(params, tx, CFG, mesh)
  batch = _batch()
  grads = jax.jit(jax.grad(lambda p: objectives.sft_loss_fn(CFG)(p, batch, None)[0]))(params)
  step = loop.make_train_step(objectives.sft_loss_fn(CFG), tx, st, mesh, batch, trainable)
  new, _ = step(st, shd.shard_batch(batch, mesh), jax.random.PRNGKey(0))
  after = jax.device_get(new.params)
  for (path, b), a, g, t in zip(jax.tree_util.tree_flatten_with_path(before)[0],
                                jax.tree_util.tree_leaves(after), jax.tree_util.tree_leaves(grads),
                                jax.tree_util.tree_leaves(trainable)):
    name = jax.tree_util.keystr(path)
    if t:
      assert np.abs(np.asarray(a) - np.asarray(b)).max() > 0, name
      assert np.abs(np.asarray(g)).max() > 0, name  # the gradient reaches every adapter
    else:
      np.testing.assert_array_equal(a, b, err_msg=name)  # the base is never updated
  # Adam's moments exist for the adapters only.
  moments = sum(x.size for x in jax.tree_util.tree_leaves(new.opt_state) if x.ndim)
  assert moments == 2 * lora.num_adapter_params(before)


def test_merged_export_reproduces_the_adapted_model_in_transformers(tmp_path):
  _, params = _adapted(seed=3)
  out = tmp_path / "merged"
  models.save_pretrained(CFG, lora.merge(params), str(out))
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
  toks = np.random.default_rng(1).integers(3, 128, (3, 11))
  ours = np.asarray(models.logits(CFG, params, jnp.asarray(toks)))
  with torch.no_grad():
    theirs = hf(input_ids=torch.tensor(toks)).logits.float().numpy()
  np.testing.assert_allclose(theirs, ours, atol=1e-5)


def test_scanned_layout_carries_the_adapters():
  _, params = _adapted(seed=5)
  stacked = models.stack_layers(CFG, params)
  assert "layers_stack" in stacked["lora"] and "layers_0" not in stacked["lora"]
  toks = jnp.asarray(np.random.default_rng(2).integers(3, 128, (2, 7)))
  scfg = CFG.replace(scan_layers=True)
  np.testing.assert_allclose(models.logits(scfg, stacked, toks), models.logits(CFG, params, toks),
                             atol=1e-5)
  back = models.unstack_layers(CFG, stacked)
  jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)


@pytest.mark.slow
def test_tiny_pipeline_with_lora_in_sft_and_ppo(tmp_path):
  """configs/tiny.py through revise, sft, label, pm and ppo with rank-4 adapters in
  SFT and PPO (policy and value model), on 2 devices (the scanned layout in SFT and
  the PPO update): the exports are ordinary merged models beside PEFT adapters, and
  the SFT model differs from the initial one."""
  import os
  import subprocess
  import sys
  from cai_jax import roles, utils
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  w = tmp_path / "lora"
  cmd = [sys.executable, "-m", "cai_jax.main", "--config=configs/tiny.py", f"--workdir={w}",
         "--config.stages=revise,sft,label,pm,ppo", "--config.sft.lora.rank=4",
         "--config.ppo.lora.rank=4", "--config.sft.max_steps=3",
         "--config.sft.optim.learning_rate=0.01", f"--config.compilation_cache={tmp_path / 'x'}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=2400)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  for s in ("sft", "ppo"):
    assert utils.is_done(str(w / s)), s
  cfg, sft, _ = roles.load(str(w / "sft" / "final"))
  _, ppo_policy, _ = roles.load(str(w / "ppo" / "final"))
  _, value = models.load_pretrained(str(w / "ppo" / "value_final"))
  assert "lora" not in sft and "lora" not in ppo_policy and "score_kernel" in value
  _, initial, _ = roles.load("tiny")
  toks = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, (2, 9)))
  assert float(jnp.abs(models.logits(cfg, sft, toks) - models.logits(cfg, initial, toks)).max()) > 0
  for s in ("sft", "ppo"):  # both trained the scanned layout on 2 devices
    assert utils.read_json(str(w / s / "memory_fit.json"))["scan_layers"], s
    conf = utils.read_json(str(w / s / "adapter" / "adapter_config.json"))
    assert conf["r"] == 4 and conf["peft_type"] == "LORA", conf


def test_planner_counts_adapter_only_optimizer_state():
  """The planner's --lora_rank: the same steps with optimizer moments for the adapters
  only, so the state per device shrinks."""
  import dataclasses
  from cai_jax.tools import plan
  shapes = plan.Shapes(sft_batch=4, sft_len=16, logits_chunk=0, ppo_batch=4, ppo_prompt=8,
                       ppo_response=4, ppo_minibatches=2, ppo_epochs=1)
  full = plan.plan(CFG, [(1, 2, 1)], shapes, steps=("ppo",), progress=None)
  adapted = plan.plan(CFG, [(1, 2, 1)], dataclasses.replace(shapes, lora_rank=1),
                      steps=("ppo",), progress=None)
  for f, a in zip(full, adapted):
    assert a.state_gib < 0.5 * f.state_gib, (f.step, f.state_gib, a.state_gib)


def test_adapters_run_beside_the_kernels_without_an_adapted_copy():
  """The adapted model's gradient step holds no adapted copy of the kernels: its
  temporaries stay below the adapted kernels' size, which merging first (what the
  forward pass did before) needs in full."""
  cfg = models.tiny(vocab_size=64, hidden_size=256, intermediate_size=1024, num_layers=2,
                    num_heads=4, num_kv_heads=4, head_dim=64, tie_embeddings=True)
  p = lora.add(models.init_params(cfg, jax.random.PRNGKey(0)), 2, 4.0, tuple(lora.TARGETS),
               jax.random.PRNGKey(1))
  toks = jnp.zeros((1, 4), jnp.int32)
  kernels = sum(x.nbytes for k in p if k.startswith("layers_")
                for blk in p[k].values() for n, x in blk.items() if n.endswith("_kernel"))

  def temp(merge_first):
    def loss(ad):
      q = dict(p, lora=ad)
      return models.logits(cfg, lora.merge(q) if merge_first else q, toks).sum()
    return jax.jit(jax.grad(loss)).lower(p["lora"]).compile().memory_analysis() \
        .temp_size_in_bytes

  assert temp(True) >= kernels  # the measure sees a merged copy
  assert temp(False) < 0.25 * kernels


def test_ppo_reference_is_the_frozen_base_of_the_train_state():
  """With LoRA the trainer holds no reference copy: each rollout reads the state's
  base (adapters dropped), which frozen_dtype holds in bf16 beside float32 adapters."""
  from cai_jax.rl import config as rl_config, trainer as trainer_lib
  _, params = _adapted(seed=2)
  c = rl_config.ppo_section()
  c.algorithm, c.batch_size, c.num_minibatches, c.max_new_tokens = "grpo", 8, 1, 4
  mesh = shd.make_mesh((1, 8, 1))
  tr = trainer_lib.PPOTrainer(c, policy_cfg=CFG, policy_params=params, value_cfg=None,
                              value_params=None, reward_fn=lambda b: jnp.zeros(8), mesh=mesh,
                              ref_dtype="bfloat16")
  state = tr.init_state()
  assert tr.ref_is_base and tr.rollout.ref_params is None
  pol = state["policy"]
  assert pol["layers_0"]["attn"]["q_kernel"].dtype == jnp.bfloat16
  assert pol["lora"]["layers_0"]["attn"]["q_kernel"]["a"].dtype == jnp.float32
  prompts = np.tile(np.arange(3, 9, dtype=np.int32), (8, 1))
  state, _, trans = tr.iteration(state, prompts, np.ones(prompts.shape, bool),
                                 jax.random.PRNGKey(0))
  tokens = jnp.concatenate([trans.prompt_tokens_BxP, trans.response_tokens_BxN], axis=1)
  mask = jnp.concatenate([trans.prompt_mask_BxP, trans.response_mask_BxN], axis=1)
  base = lora.base(jax.device_get(params))
  base = jax.tree_util.tree_map(lambda x: jnp.asarray(x).astype(jnp.bfloat16), base)
  P, N = prompts.shape[1], trans.response_tokens_BxN.shape[1]
  logits = models.logits(CFG, base, tokens, mask)[:, P - 1:P + N - 1]
  want = jnp.take_along_axis(jax.nn.log_softmax(logits), trans.response_tokens_BxN[..., None],
                             -1)[..., 0]
  np.testing.assert_allclose(np.where(trans.response_mask_BxN, trans.ref_logprobs_BxN, 0),
                             np.where(trans.response_mask_BxN, want, 0), atol=1e-5)


def test_peft_adapter_export_loads_on_the_base_in_transformers(tmp_path):
  """The adapters alone, in the PEFT layout, applied by peft to the base's HF export,
  reproduce the adapted model's logits."""
  import peft
  _, params = _adapted(seed=4, targets=("q", "v", "o", "up", "down"))
  models.save_pretrained(CFG, lora.base(params), str(tmp_path / "base"))
  models.save_peft_adapter(CFG, params, str(tmp_path / "adapter"), base_model="base")
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"))
  hf = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
  toks = np.random.default_rng(5).integers(3, 128, (2, 10))
  ours = np.asarray(models.logits(CFG, params, jnp.asarray(toks)))
  with torch.no_grad():
    theirs = hf(input_ids=torch.tensor(toks)).logits.float().numpy()
  np.testing.assert_allclose(theirs, ours, atol=1e-5)
  # A model without adapters has nothing to write.
  with pytest.raises(ValueError, match="no LoRA adapters"):
    models.save_peft_adapter(CFG, lora.base(params), str(tmp_path / "none"), base_model="base")
