"""Memory planner: abstract (never allocated) steps compile, and their shardings
and memory match what the real training state would use."""
import jax
import numpy as np
import pytest

from cai_jax import models, sharding
from cai_jax.tools import plan

MESH = (1, 4, 2)
SHAPES = plan.Shapes(sft_batch=8, sft_len=32, logits_chunk=8, ppo_batch=8, ppo_prompt=16,
                     ppo_response=8, ppo_minibatches=2, ppo_epochs=1, dpo_batch=8, dpo_len=24)


def tiny():
  return models.tiny(vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=8)


def test_parse_meshes():
  assert plan.parse_meshes("1,8,1; 2,2,2;") == ((1, 8, 1), (2, 2, 2))
  for bad in ("1,8", "a,b,c", "", "1,0,1"):
    with pytest.raises(plan.PlanError):
      plan.parse_meshes(bad)


def test_model_config_presets_and_errors(tmp_path):
  cfg = plan.model_config("llama2-7b", "bfloat16", remat=True)
  assert cfg.num_layers == 32 and cfg.remat and cfg.param_dtype == "bfloat16"
  assert 6.7e9 < cfg.num_params() < 6.8e9
  with pytest.raises(plan.PlanError, match="not a preset"):
    plan.model_config(str(tmp_path))


def _big_live_arrays():
  return {id(x) for x in jax.live_arrays() if x.nbytes >= 64 * 1024}


@pytest.fixture(scope="module")
def rows():
  before = _big_live_arrays()
  out = plan.plan(tiny(), [MESH], SHAPES, progress=None)
  # Planning allocates no parameters, optimizer slots or batches.
  assert _big_live_arrays() <= before
  return out


def test_plan_reports_both_steps(rows):
  assert [(r.step, r.mesh, r.devices) for r in rows] == [("sft", MESH, 8), ("ppo", MESH, 8)]
  for r in rows:
    assert r.argument_gib >= r.state_gib > 0
    assert r.temp_gib > 0
    assert r.total_gib == pytest.approx(r.argument_gib + r.output_gib + r.temp_gib + r.frozen_gib)
  sft, ppo = rows
  # PPO holds two models (policy, value) with their optimizer states, plus the
  # frozen reference and PM beside them.
  assert ppo.state_gib > 1.5 * sft.state_gib
  assert ppo.frozen_gib > 0
  assert "| sft | 1,4,2 | 8 |" in plan.format_table(rows)


def test_critic_free_update_holds_no_value_model():
  rows = plan.plan(tiny(), [MESH], SHAPES, steps=("ppo", "grpo", "dpo"), progress=None)
  ppo, grpo, dpo = rows
  # DPO holds the policy and its optimizer state only: no reference, value model or PM.
  assert dpo.frozen_gib == 0 and dpo.state_gib == pytest.approx(grpo.state_gib, rel=1e-6)
  assert grpo.step == "grpo"
  # Exactly one model (the value model) and its optimizer state fewer.
  from cai_jax.training import optim
  mesh = sharding.make_mesh(MESH, devices=jax.devices()[:8])
  value = plan.abstract_sharded_params(tiny(), mesh, ("score",), sharding.DEFAULT_RULES)
  opt = plan.abstract_opt_state(optim.make_optimizer(optim.default_optim_config()), value, mesh)
  value_gib = (plan.per_device_bytes(value) + plan.per_device_bytes(opt)) / plan.GiB
  assert ppo.state_gib - grpo.state_gib == pytest.approx(value_gib, rel=1e-6)
  assert grpo.total_gib < ppo.total_gib
  assert grpo.frozen_gib == ppo.frozen_gib    # reference and PM stay resident in both


def test_abstract_state_matches_real_train_state(rows):
  """The planned per-device state bytes equal a real sharded TrainState's."""
  from cai_jax import training
  cfg = tiny()
  mesh = sharding.make_mesh(MESH)
  tx = training.make_optimizer(training.default_optim_config())
  real = training.create_train_state(models.init_params(cfg, jax.random.PRNGKey(0)), tx, cfg, mesh)
  dev = jax.devices()[0]
  real_bytes = sum(s.data.nbytes for x in jax.tree_util.tree_leaves(real)
                   for s in x.addressable_shards if s.device == dev)
  assert rows[0].state_gib * plan.GiB == real_bytes
  abstract = plan.abstract_sharded_params(cfg, mesh, ("lm",), sharding.DEFAULT_RULES)
  for a, r in zip(jax.tree_util.tree_leaves(abstract), jax.tree_util.tree_leaves(real.params)):
    assert a.sharding.is_equivalent_to(r.sharding, a.ndim) and a.shape == r.shape


@pytest.mark.slow
def test_sft_memory_equals_real_step_compile():
  """Compiling the step for real arrays gives the same memory analysis."""
  from cai_jax import training
  from cai_jax.training import objectives
  cfg = tiny()
  mesh = sharding.make_mesh(MESH)
  lowered, _, _ = plan.lower_sft(cfg, mesh, SHAPES, training.default_optim_config(),
                                 sharding.DEFAULT_RULES)
  planned = lowered.compile().memory_analysis()
  tx = training.make_optimizer(training.default_optim_config())
  st = training.create_train_state(models.init_params(cfg, jax.random.PRNGKey(0)), tx, cfg, mesh)
  B, L = SHAPES.sft_batch, SHAPES.sft_len
  batch = {"tokens_BxL": np.zeros((B, L), np.int32), "targets_BxL": np.zeros((B, L), np.int32),
           "loss_mask_BxL": np.ones((B, L), np.float32), "mask_BxL": np.ones((B, L), bool)}
  step = training.make_train_step(objectives.sft_loss_fn(cfg, SHAPES.logits_chunk), tx, st,
                                  mesh, batch)
  real = step.lower(st, sharding.shard_batch(batch, mesh), jax.random.PRNGKey(0)).compile()
  real = real.memory_analysis()
  for field in ("argument_size_in_bytes", "temp_size_in_bytes", "output_size_in_bytes"):
    assert getattr(planned, field) == getattr(real, field), field


def test_scanned_layers_hold_one_layer_of_gathered_weights():
  """Under FSDP the unrolled layout lets the CPU schedule gather every layer's
  weights at once; the scanned layout (the planner's default) holds the same
  state but needs temporaries for about one layer, so its temp is smaller and
  grows far less with depth."""
  shapes = plan.Shapes(sft_batch=8, sft_len=32, logits_chunk=16)
  temp, state = {}, {}
  for layers in (2, 8):
    for scan in (False, True):
      cfg = models.tiny(vocab_size=256, hidden_size=256, intermediate_size=1024,
                        num_layers=layers, num_heads=4, num_kv_heads=4, head_dim=64,
                        scan_layers=scan)
      (row,) = plan.plan(cfg, [(1, 8, 1)], shapes, steps=("sft",), progress=None)
      temp[layers, scan], state[layers, scan] = row.temp_gib, row.state_gib
  assert state[8, True] == pytest.approx(state[8, False], rel=1e-3)
  assert temp[8, True] < temp[8, False]
  assert temp[8, True] - temp[2, True] < 0.5 * (temp[8, False] - temp[2, False])


def test_bigger_mesh_means_less_state_per_device():
  """Arithmetic on shardings only: fsdp=8 holds under half of what fsdp=2 holds."""
  from cai_jax import training
  cfg = tiny()
  tx = training.make_optimizer(training.default_optim_config())
  per = {}
  for dims in ((1, 2, 1), (1, 8, 1)):
    mesh = sharding.make_mesh(dims, devices=jax.devices()[:dims[1]])
    params = plan.abstract_sharded_params(cfg, mesh, ("lm",), sharding.DEFAULT_RULES)
    per[dims] = plan.per_device_bytes((params, plan.abstract_opt_state(tx, params, mesh)))
  assert per[(1, 8, 1)] < 0.5 * per[(1, 2, 1)]


def test_optimizer_moments_are_sharded_like_params():
  """Adam's mu/nu (also under masks and accumulation) follow the params' shardings."""
  from cai_jax import training
  cfg = tiny()
  mesh = sharding.make_mesh((1, 8, 1))
  params = sharding.shard_params(models.init_params(cfg, jax.random.PRNGKey(0)), cfg, mesh)
  oc = training.default_optim_config()
  oc.grad_accum_steps = 2
  for trainable in (None, training.trainable_mask(params, 1)):
    tx = training.make_optimizer(oc, trainable=trainable)
    st = training.create_train_state(params, tx, cfg, mesh)
    moments = 0
    for path, x in jax.tree_util.tree_flatten_with_path(st.opt_state)[0]:
      key = jax.tree_util.keystr(path)
      if key.endswith("['embedding']"):
        assert x.sharding.is_equivalent_to(params["embedding"].sharding, 2), key
        moments += 1
      elif x.ndim == 0:
        assert x.sharding.is_fully_replicated
    assert moments >= 3  # mu, nu, accumulated gradients


def test_cli_errors_exit_2(capsys):
  assert plan.main(["--model", "no-such-model", "--meshes", "1,2,1"]) == 2
  assert "not a preset" in capsys.readouterr().err
  assert plan.main(["--model", "tiny", "--meshes", "1,3,1", "--sft_batch", "8",
                    "--steps", "sft"]) == 2
  assert "does not divide" in capsys.readouterr().err
  assert plan.main(["--config", "/nonexistent.py", "--meshes", "1,2,1"]) == 2
  assert "file not found" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_prints_table_for_hf_dir(tmp_path, capsys):
  import json
  (tmp_path / "config.json").write_text(json.dumps(tiny().to_hf_dict()))
  out_json = tmp_path / "rows.json"
  assert plan.main(["--model", str(tmp_path), "--meshes", "1,2,1", "--steps", "sft",
                    "--sft_batch", "4", "--sft_len", "16", "--dtype", "float32",
                    "--json", str(out_json)]) == 0
  out = capsys.readouterr().out
  assert "| sft | 1,2,1 | 2 |" in out
  rows = json.loads(out_json.read_text())
  assert rows[0]["step"] == "sft" and rows[0]["total_gib"] > 0


def test_cli_refuses_more_devices_than_jax_started_with(capsys):
  assert plan.main(["--model", "tiny", "--meshes", "1,64,1"]) == 2
  assert "fresh process" in capsys.readouterr().err
