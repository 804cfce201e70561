"""Command-line tools that plan or inspect runs (memory planner: `python -m cai_jax.tools.plan`)."""
