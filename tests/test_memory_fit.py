"""Fitting steps to device memory: accumulated micro-batches give the big-batch step,
and the split chosen is the largest micro-batch that fits (8 simulated devices)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax import models, sharding as shd
from cai_jax.rl import update as update_lib
from cai_jax.training import accumulate, data, loop, memory, objectives, optim
from cai_jax.training import state as state_lib
from cai_jax.tools import plan

CFG = models.tiny(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8, tie_embeddings=True)
B, L = 16, 16
TOL = 1e-5


def _mesh():
  return shd.make_mesh((1, 8, 1), devices=jax.devices()[:8])


def _sft_batch(seed=0):
  rng = np.random.default_rng(seed)
  ex = []
  for i in range(B):
    k = int(rng.integers(4, L + 1))
    # Uneven loss-token counts, and rows with none (a micro-batch may have few).
    mask = np.arange(k) >= (k if i % 5 == 0 else int(rng.integers(1, k)))
    ex.append(data.SFTExample(rng.integers(3, 128, size=k).astype(np.int32), mask))
  return data.sft_batch(ex, [[i] for i in range(B)], L, pad_id=0)


def _pm_batch(seed=0):
  rng = np.random.default_rng(seed)
  pairs = [data.PairExample(rng.integers(3, 128, size=int(rng.integers(3, L))).astype(np.int32),
                            rng.integers(3, 128, size=int(rng.integers(3, L))).astype(np.int32),
                            float(rng.uniform())) for _ in range(B)]
  return data.pair_batch(pairs, L, pad_id=0)


def _optim():
  # Adam's first step is lr * g / (|g| + eps): with the default eps a gradient entry
  # near zero turns round-off into an lr-sized step; a larger eps keeps the update a
  # smooth function of the gradient, which the comparison needs.
  oc = optim.default_optim_config()
  oc.learning_rate, oc.eps = 1e-3, 1e-4
  return oc


def _step(loss_fn, heads, batch, k):
  """(new params, metrics) of one step with k micro-batches, from the same init."""
  mesh = _mesh()
  tx = optim.make_optimizer(_optim())
  params = models.init_params(CFG, jax.random.PRNGKey(0), heads=heads)
  st = state_lib.create_train_state(params, tx, CFG, mesh)
  step = loop.make_train_step(loss_fn, tx, st, mesh, batch, micro_batches=k)
  new, metrics = step(st, shd.shard_batch(batch, mesh), jax.random.PRNGKey(1))
  return jax.device_get(new.params), {k: float(v) for k, v in jax.device_get(metrics).items()}


def _close(a, b, tol=TOL):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


@pytest.mark.parametrize("k", [2, 4])
def test_sft_micro_batches_equal_the_big_batch_step(k):
  batch = _sft_batch()
  one_p, one_m = _step(objectives.sft_loss_fn(CFG), ("lm",), batch, 1)
  acc_p, acc_m = _step(objectives.sft_loss_fn(CFG), ("lm",), batch, k)
  assert acc_m["loss_tokens"] == one_m["loss_tokens"] == float(batch["loss_mask_BxL"].sum())
  for key in ("loss", "grad_norm"):
    assert acc_m[key] == pytest.approx(one_m[key], rel=TOL, abs=TOL), key
  _close(acc_p, one_p)


def test_sft_gradients_equal_the_big_batch_gradients():
  batch = {k: jnp.asarray(v) for k, v in _sft_batch(3).items()}
  params = models.init_params(CFG, jax.random.PRNGKey(2))
  f = objectives.sft_loss_fn(CFG)
  (l1, _), g1 = jax.value_and_grad(f, has_aux=True)(params, batch, None)
  w, keys = accumulate.weighting(f)
  (l4, aux), g4 = jax.jit(accumulate.value_and_grad(f, 4, weight_of=w, sum_keys=keys))(
      params, batch, None)
  assert float(l4) == pytest.approx(float(l1), rel=TOL)
  assert float(aux["loss_tokens"]) == float(batch["loss_mask_BxL"].sum())
  _close(g4, g1)


@pytest.mark.parametrize("k", [4])
def test_pm_micro_batches_equal_the_big_batch_step(k):
  batch = _pm_batch()
  one_p, one_m = _step(objectives.pm_loss_fn(CFG), ("score",), batch, 1)
  acc_p, acc_m = _step(objectives.pm_loss_fn(CFG), ("score",), batch, k)
  for key in ("loss", "grad_norm", "accuracy"):
    assert acc_m[key] == pytest.approx(one_m[key], rel=TOL, abs=TOL), key
  _close(acc_p, one_p)


def test_micro_batch_rows_are_strided_so_no_rows_move_between_devices():
  x = jnp.arange(16)
  parts = accumulate.split({"x": x}, 4)["x"]
  assert parts.tolist() == [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]]
  assert accumulate.valid_counts(16, 4) == [1, 2, 4]
  with pytest.raises(ValueError, match="does not split"):
    accumulate.split({"x": x}, 3)


@pytest.mark.parametrize("critic", [True, False])
def test_ppo_update_is_unchanged_by_micro_batches(critic):
  mesh = _mesh()
  N, P, Bp = 6, 10, 16
  rng = np.random.default_rng(0)
  hp1 = update_lib.UpdateHParams(epochs=2, num_minibatches=2, critic=critic,
                                 kl_in_loss=not critic)
  batch = {}
  for k, s in update_lib.example_batch(hp1, Bp, P, N).items():
    if k == "tokens":
      batch[k] = rng.integers(3, 128, size=s.shape).astype(np.int32)
    elif k == "mask":
      m = np.ones(s.shape, bool)
      m[:, :3] = rng.uniform(size=(Bp, 3)) < 0.5  # left padding of the prompts
      batch[k] = m
    elif k == "response_mask":
      lens = rng.integers(0, N + 1, size=Bp)  # including empty responses
      batch[k] = np.arange(N)[None, :] < lens[:, None]
    else:
      batch[k] = rng.normal(size=s.shape).astype(np.float32) * (0.1 if "logprobs" in k else 1)
  batch["mask"][:, P:] = batch["response_mask"]
  tx = optim.make_optimizer(_optim())
  results = []
  for k in (1, 2):
    policy = models.init_params(CFG, jax.random.PRNGKey(0))
    value = models.init_params(CFG, jax.random.PRNGKey(1), heads=("score",)) if critic \
        else None
    state = update_lib.init_state(shd.shard_params(policy, CFG, mesh), None if value is None
                                  else shd.shard_params(value, CFG, mesh), tx,
                                  tx if critic else None, mesh)
    fn = update_lib.make_update_fn(CFG, CFG if critic else None, tx, tx if critic else None,
                                   hp1._replace(micro_batches=k), mesh,
                                   update_lib.state_shardings(state, mesh), Bp)
    sh = update_lib.batch_input_sharding(mesh, Bp)
    placed = {key: jax.device_put(v, sh) for key, v in batch.items()}
    new, metrics = fn(state, placed, jax.random.PRNGKey(3), jnp.float32(0.1))
    results.append((jax.device_get(new), jax.device_get(metrics)))
  (s1, m1), (s2, m2) = results
  _close(s2["policy"], s1["policy"])
  if critic:
    _close(s2["value"], s1["value"])
  for key in m1:
    assert float(m2[key]) == pytest.approx(float(m1[key]), rel=1e-4, abs=TOL), key


# ----------------------------------------------------------------- the choice
def _fake_memory(table):
  """measure() from {(k, remat): GiB}, recording the calls."""
  calls = []

  def measure(split):
    calls.append(split)
    return int(table[(split.micro_batches, split.remat)] * memory.GiB)
  return measure, calls


def test_choose_takes_the_largest_micro_batch_that_fits():
  # Memory falls with k, and remat saves 40% of it.
  table = {(k, r): (10.0 / k + 1.0) * (0.6 if r else 1.0) for k in (1, 2, 4, 8, 16)
           for r in (False, True)}
  budget = int(3.2 * memory.GiB)
  measure, calls = _fake_memory(table)
  fit = memory.choose(measure, 16, 1, budget, memory.Split(logits_chunk=0), chunked=True)
  # remat fits at k=4 (2.1 GiB) but not k=2 (3.6); without remat k=4 needs 3.5: remat on.
  assert fit.split == memory.Split(micro_batches=4, remat=True, logits_chunk=256)
  # Each probe measures both settings once: the largest count, then a binary search.
  assert fit.bytes <= budget and len(calls) == len(set(calls)) <= 2 * (2 + 3)
  # A larger budget: k=4 without remat (3.5 GiB) fits, and wins at the same micro-batch.
  fit = memory.choose(_fake_memory(table)[0], 16, 1, int(3.6 * memory.GiB))
  assert fit.split == memory.Split(micro_batches=2, remat=True)
  fit = memory.choose(_fake_memory(table)[0], 16, 1, int(11.5 * memory.GiB))
  assert fit.split == memory.Split(micro_batches=1, remat=False)
  # The batch axes: a micro-batch must spread over 4 devices, so k <= 4.
  with pytest.raises(memory.FitError, match="no split fits"):
    memory.choose(_fake_memory(table)[0], 16, 4, int(1.5 * memory.GiB))
  # Unknown device memory: nothing is compiled; one micro-batch, the config's settings.
  measure, calls = _fake_memory(table)
  fit = memory.choose(measure, 16, 1, None, memory.Split(remat=True))
  assert fit.split == memory.Split(micro_batches=1, remat=True) and not calls
  # A count set in the config is only checked.
  assert memory.choose(_fake_memory(table)[0], 16, 1, int(11.5 * memory.GiB),
                       fixed_micro_batches=8).split.micro_batches == 8
  with pytest.raises(memory.FitError, match="one of 1, 2, 4"):
    memory.choose(_fake_memory(table)[0], 16, 4, None, fixed_micro_batches=8)


def test_device_budget():
  assert memory.device_budget(16) == int(16 * memory.GiB * memory.HEADROOM)
  assert memory.device_budget(0) is None  # the CPU reports no memory limit


@pytest.mark.slow
def test_fit_with_a_small_budget_splits_the_real_step(tmp_path):
  """training.fit on 8 devices with a budget between the 1- and 2-micro-batch steps'
  compiled sizes (scanned layout, as fit trains it there) does not run the step whole,
  and trains."""
  from cai_jax.training import fit as fit_lib
  mesh = _mesh()
  batch = _sft_batch()
  tx = optim.make_optimizer(optim.default_optim_config())
  params = models.init_params(CFG, jax.random.PRNGKey(0))
  scanned = CFG.replace(scan_layers=True)
  st = state_lib.create_train_state(models.stack_layers(CFG, params), tx, scanned, mesh)
  sizes = {}
  for k in (1, 2):
    step = loop.make_train_step(objectives.sft_loss_fn(scanned), tx, st, mesh, batch,
                                micro_batches=k)
    sizes[k] = memory.compiled_bytes(step.lower(st, batch, jax.random.PRNGKey(0)).compile())
  assert sizes[2] < sizes[1]
  hbm = (sizes[1] + sizes[2]) / 2 / memory.HEADROOM / memory.GiB

  res = fit_lib.fit("sft", cfg=CFG, params=params, tokenizer=None, batches=_Batches(batch),
                    example_batch=batch, num_steps=2, optim_config=optim.default_optim_config(),
                    loss_for=lambda c, s: objectives.sft_loss_fn(c, s.logits_chunk),
                    logits_chunk=0, mesh=mesh, rules=shd.DEFAULT_RULES,
                    directory=str(tmp_path), async_save=False, progress=False, hbm_gib=hbm)
  assert res.step == 2 and res.fit["scan_layers"]
  assert res.fit["micro_batches"] >= 2 or res.fit["remat"]
  assert res.fit["gib_per_device"] * memory.GiB <= hbm * memory.GiB * memory.HEADROOM + 1


def test_parse_slice():
  assert plan.parse_slice("v5e-16") == ("v5e", 16, 16)
  assert plan.parse_slice("v4-32") == ("v4", 16, 32)
  assert plan.parse_slice("v5p-64") == ("v5p", 32, 95)
  for bad in ("v6-8", "v5e", "v4-3", "v5p-x"):
    with pytest.raises(plan.PlanError):
      plan.parse_slice(bad)


@pytest.mark.slow
def test_slice_plan_on_a_small_model(capsys):
  """The planner's --slice path on the tiny model over 8 simulated chips (v5p-16):
  every step fits with one micro-batch, and the CLI prints the split table."""
  shapes = plan.Shapes(sft_batch=16, sft_len=32, logits_chunk=0, ppo_batch=16, ppo_prompt=16,
                       ppo_response=8, ppo_minibatches=2, ppo_epochs=1, pm_batch=16, pm_len=32)
  fits = plan.fit_slice(CFG, "v5p-16", shapes, progress=None)
  assert [s for s, _ in fits] == ["sft", "pm", "ppo"]
  for _, f in fits:
    assert f.split.micro_batches == 1 and not f.split.remat and 0 < f.bytes < f.budget
  assert "| sft | 16 | 16 | 1 | off |" in plan.format_fits(fits, "v5p-16")
  assert plan.main(["--model", "tiny", "--slice", "v5p-64"]) == 2
  assert "fresh process" in capsys.readouterr().err


class _Batches:
  def __init__(self, batch):
    self.batch = batch

  def __next__(self):
    return self.batch

  def get_state(self):
    return {}

  def set_state(self, s):
    pass


def _fit(tmp, mesh, batch, **kw):
  from cai_jax.training import fit as fit_lib
  return fit_lib.fit("sft", cfg=CFG, params=models.init_params(CFG, jax.random.PRNGKey(0)),
                     tokenizer=None, batches=_Batches(batch), example_batch=batch, num_steps=2,
                     optim_config=_optim(),
                     loss_for=lambda c, s: objectives.sft_loss_fn(c, s.logits_chunk),
                     logits_chunk=0, mesh=mesh, rules=shd.DEFAULT_RULES, directory=str(tmp),
                     async_save=False, progress=False, **kw)


def test_scanned_training_layout_equals_the_unrolled_one(tmp_path):
  """On 8 devices fit trains the scanned layout; its result (returned unrolled) equals
  one device's unrolled training, and a resume keeps the layout it started with."""
  from cai_jax.training import fit as fit_lib
  batch = _sft_batch(5)
  one = _fit(tmp_path / "one", shd.make_mesh((1, 1, 1), devices=jax.devices()[:1]), batch)
  eight = _fit(tmp_path / "eight", _mesh(), batch)
  assert not one.fit["scan_layers"] and eight.fit["scan_layers"]
  assert set(eight.state.params) == set(one.state.params)  # layers_0.., no layers_stack
  _close(jax.device_get(eight.state.params), jax.device_get(one.state.params))
  # The layout is recorded beside the checkpoints and wins over the device count.
  assert fit_lib.train_layout(CFG, shd.make_mesh((1, 1, 1), devices=jax.devices()[:1]), -1,
                              str(tmp_path / "eight" / "checkpoints"))
  # Training only the top layers needs per-layer leaves.
  assert not fit_lib.train_layout(CFG, _mesh(), 1, str(tmp_path / "none"))


def test_ppo_fit_counts_the_models_resident_beside_the_update():
  """The PPO update's fit counts the reward's PM and the reference beside the state;
  a LoRA policy's reference is its own base, which counts nothing extra."""
  from cai_jax.models import lora
  from cai_jax.rl import config as rl_config, rollout, trainer as trainer_lib
  mesh = _mesh()
  c = rl_config.ppo_section()
  c.algorithm, c.batch_size, c.num_minibatches, c.max_new_tokens = "grpo", 8, 1, 4
  c.max_prompt_tokens = 8
  policy = models.init_params(CFG, jax.random.PRNGKey(0))
  pm = shd.shard_params(models.init_params(CFG, jax.random.PRNGKey(1), heads=("score",)),
                        CFG, mesh)
  fits = {}
  for name, reward, params in (
      ("none", lambda b: jnp.zeros(8), policy),
      ("pm", rollout.PMReward(CFG, pm, None, (2,), (), 16), policy),
      ("pm+lora", rollout.PMReward(CFG, pm, None, (2,), (), 16),
       lora.add(policy, 2, 4.0, ("q",), jax.random.PRNGKey(2)))):
    tr = trainer_lib.PPOTrainer(c, policy_cfg=CFG, policy_params=params, value_cfg=None,
                                value_params=None, reward_fn=reward, mesh=mesh, hbm_gib=1.0)
    state = tr.init_state()
    tr._update_fn(state)
    fits[name] = (tr.fit.bytes, tr.rollout.ref_params)
  assert fits["pm"][0] - fits["none"][0] == state_lib.per_device_bytes(pm)
  assert fits["pm+lora"][1] is None  # no reference copy
  # The LoRA state holds the adapters and their moments, not the reference's weights.
  assert fits["pm+lora"][0] < fits["pm"][0]
