"""Constitutional AI (SL-CAI and RL-CAI) in JAX/Flax."""
__version__ = "0.1.0"
