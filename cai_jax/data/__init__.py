"""Input data: local-file readers, TFDS builders, built-in prompt sets, SL-CAI reader.

The TFDS builders live in `cai_jax.data.builders` (imported on use, since
tensorflow_datasets is slow to import).
"""
from cai_jax.data import sources  # noqa: F401
