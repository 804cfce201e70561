"""Expected calibration error against hand-computed values; reliability diagram PNG."""
import os

import numpy as np
import pytest

from cai_jax.evaluation import calibration


def test_ece_hand_computed():
  # 4 bins. Bin [0.5,0.75): confs .6,.7 acc 1/2 -> gap |.5-.65|=.15, weight 2/5.
  # Bin [0.75,1]: confs .8,.9,1.0 acc 3/3 -> gap |1-.9|=.1, weight 3/5.
  conf = [0.6, 0.7, 0.8, 0.9, 1.0]
  right = [True, False, True, True, True]
  ece = calibration.expected_calibration_error(conf, right, num_bins=4)
  assert ece == pytest.approx(0.4 * 0.15 + 0.6 * 0.1, abs=1e-12)
  b = calibration.calibration_bins(conf, right, num_bins=4)
  assert b["count"].tolist() == [0, 0, 2, 3]
  assert np.isnan(b["accuracy"][0])


def test_ece_zero_when_calibrated_and_one_when_maximally_wrong():
  conf = np.full(8, 0.75)  # 6 of 8 right at confidence 0.75
  right = np.array([True, True, True, False] * 2)
  assert calibration.expected_calibration_error(conf, right) == pytest.approx(0.0, abs=1e-12)
  assert calibration.expected_calibration_error([1.0, 1.0], [False, False]) == pytest.approx(1.0)


def test_top_label_and_all_options():
  probs = [np.array([0.2, 0.8]), np.array([0.5, 0.3, 0.2])]
  correct = [[True, False], [True, False, False]]
  conf, right = calibration.top_label(probs, correct)
  assert conf.tolist() == [0.8, 0.5] and right.tolist() == [False, True]
  conf, right = calibration.all_options(probs, correct)
  assert conf.tolist() == [0.2, 0.8, 0.5, 0.3, 0.2]
  assert right.tolist() == [True, False, True, False, False]


def test_bad_input():
  with pytest.raises(ValueError):
    calibration.expected_calibration_error([1.2], [True])
  with pytest.raises(ValueError):
    calibration.expected_calibration_error([0.5, 0.5], [True])


def test_reliability_diagram_png(tmp_path):
  rng = np.random.default_rng(0)
  conf = rng.uniform(0.5, 1.0, 200)
  right = rng.uniform(size=200) < conf
  path = str(tmp_path / "sub" / "rel.png")
  ece = calibration.reliability_diagram(conf, right, path, title="synthetic")
  assert ece == pytest.approx(calibration.expected_calibration_error(conf, right))
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert not [p for p in os.listdir(tmp_path / "sub") if p.startswith(".tmp")]
