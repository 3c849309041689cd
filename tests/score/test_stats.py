"""soup.score.stats and soup.score.calibrate against answers known in advance (no models, no data)."""

import math

import pytest
import torch

from soup.score import stats
from soup.score.calibrate import calibration_record, fit_temperature


def test_constant_predictor_has_a_zero_width_interval():
    always, never = torch.ones(500, dtype=torch.bool), torch.zeros(500, dtype=torch.bool)
    result = stats.intervals(torch.stack([always, never]), ref=1)
    assert result["low"] == [1.0, 0.0] and result["high"] == [1.0, 0.0]
    assert result["diff_low"] == [1.0, 0.0] and result["diff_high"] == [1.0, 0.0]


def test_a_row_against_itself_differs_by_exactly_zero():
    correct = torch.rand(300, generator=torch.Generator().manual_seed(1)) < 0.7
    result = stats.intervals(torch.stack([correct, correct]), ref=0)
    assert result["diff_low"] == [0.0, 0.0] and result["diff_high"] == [0.0, 0.0]
    assert stats.mcnemar(correct, correct) == 1.0


def test_interval_covers_the_accuracy_and_has_the_binomial_width():
    n, p = 2500, 0.8
    correct = torch.arange(n) < int(n * p)  # exactly 80% right
    result = stats.intervals(correct[None])
    low, high = result["low"][0], result["high"][0]
    assert low < p < high
    # The bootstrap's 95% interval of a proportion is about ±1.96·sqrt(p(1-p)/n).
    assert (high - low) / 2 == pytest.approx(1.96 * math.sqrt(p * (1 - p) / n), rel=0.15)


def test_bootstrap_is_reproducible_under_its_seed():
    correct = torch.rand(4, 400, generator=torch.Generator().manual_seed(0)) < 0.6
    assert torch.equal(stats.bootstrap_means(correct, 200, seed=7), stats.bootstrap_means(correct, 200, seed=7))
    assert not torch.equal(stats.bootstrap_means(correct, 200, seed=7), stats.bootstrap_means(correct, 200, seed=8))
    # A row's resamples do not depend on which other rows are scored beside it (one shared index set).
    alone = stats.bootstrap_means(correct[:1], 200, seed=7)
    assert torch.allclose(alone[:, 0], stats.bootstrap_means(correct, 200, seed=7)[:, 0])


def test_mcnemar_matches_the_exact_binomial_on_a_hand_built_table():
    # 2x2 table of (row right?, ref right?): 50 both, 3 only the row, 12 only the ref, 10 neither.
    row = torch.tensor([1] * 50 + [1] * 3 + [0] * 12 + [0] * 10, dtype=torch.bool)
    ref = torch.tensor([1] * 50 + [0] * 3 + [1] * 12 + [0] * 10, dtype=torch.bool)
    assert stats.discordant(row, ref) == (3, 12)
    expected = 2 * sum(math.comb(15, k) for k in range(0, 4)) / 2 ** 15
    assert stats.mcnemar(row, ref) == pytest.approx(expected, rel=1e-9)
    assert stats.mcnemar(ref, row) == pytest.approx(expected, rel=1e-9)  # two-sided: symmetric
    assert stats.mcnemar_exact(7, 7) == 1.0 and stats.mcnemar_exact(0, 0) == 1.0
    big = 2 * sum(math.comb(400, k) for k in range(0, 171)) / 2 ** 400
    assert stats.mcnemar_exact(170, 230) == pytest.approx(big, rel=1e-6)


def test_ece_of_a_perfectly_calibrated_set_is_near_zero_and_of_an_overconfident_one_is_not():
    generator = torch.Generator().manual_seed(0)
    confidence = 0.2 + 0.8 * torch.rand(200_000, generator=generator)
    correct = torch.rand(200_000, generator=generator) < confidence  # right exactly as often as it claims
    assert stats.expected_calibration_error(confidence, correct) < 0.005
    overconfident = torch.full((1000,), 0.95)
    right = torch.arange(1000) < 700
    assert stats.expected_calibration_error(overconfident, right) == pytest.approx(0.25, abs=1e-6)
    bins = stats.reliability(overconfident, right)
    assert len(bins["count"]) == 15 and bins["count"][14] == 1000 and sum(bins["count"]) == 1000


def test_temperature_scaling_recovers_a_known_temperature():
    generator = torch.Generator().manual_seed(0)
    true_logits = 2.0 * torch.randn(10_000, 10, generator=generator)
    targets = torch.multinomial(true_logits.softmax(dim=1), 1, generator=generator).squeeze(1)
    for temperature in (0.5, 2.5):
        # Logits `temperature` times too sharp (or soft): dividing by it gives back the true probabilities.
        fitted = fit_temperature(true_logits * temperature, targets)
        assert fitted == pytest.approx(temperature, rel=0.05)
    record = calibration_record(true_logits * 2.5, targets, "val")
    assert record["nll_after"] < record["nll_before"] and record["ece_after"] < record["ece_before"]
    assert record["split"] == "val" and record["images"] == 10_000


def test_per_class_names_the_worst_classes_and_confusions():
    classes = ["a", "b", "c"]
    targets = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    predicted = torch.tensor([0, 0, 0, 0, 2, 2, 2, 1, 2, 0])
    report = stats.per_class(predicted, targets, classes, k=2)
    assert [(w["class"], w["accuracy"]) for w in report["worst"]] == [("b", 0.25), ("c", 0.5)]
    assert report["confused"][0] == {"true": "b", "predicted": "c", "images": 3, "share": 0.75}
    assert report["confused"][1]["true"] == "c" and report["confused"][1]["predicted"] == "a"
