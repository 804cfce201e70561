"""The paper's evaluations: Elo from pairwise comparisons, multiple-choice accuracy,
calibration, evasiveness, absolute harmfulness, plots and the run report."""
