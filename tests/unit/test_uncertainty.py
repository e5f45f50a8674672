"""Unit tests for ml_backend.uncertainty on hand-computed cases.

Expected values are literals worked out by hand (the arithmetic is in the comments), never recomputed
with the formula under test.
"""

import math

import numpy as np
import pytest

from ml_backend.uncertainty import (
    ImageUncertainty,
    UncertaintyConfig,
    aggregate,
    class_distribution,
    classification_uncertainty,
    combine,
    confidence_variance,
    detection_count,
    detection_uncertainty,
    entropy,
    least_confidence,
    margin,
    maximum,
    mean,
    task_score,
    topk_sum,
)

APPROX = {"abs": 1e-9}


# --------------------------------------------------------------------------- class_distribution


def test_class_distribution_normalises_rows():
    # [1, 3] / 4 = [0.25, 0.75]; [2, 2, ...] handled per row
    out = class_distribution(np.array([[1.0, 3.0], [0.2, 0.2]]))
    assert out.shape == (2, 2)
    assert out[0].tolist() == pytest.approx([0.25, 0.75], **APPROX)
    assert out[1].tolist() == pytest.approx([0.5, 0.5], **APPROX)


def test_class_distribution_zero_row_becomes_uniform():
    # all zeros over k=4 -> 1/4 each; the other row [0.6, 0.2, 0.2, 0] / 1.0 unchanged
    out = class_distribution(np.array([[0.0, 0.0, 0.0, 0.0], [0.6, 0.2, 0.2, 0.0]]))
    assert out[0].tolist() == pytest.approx([0.25, 0.25, 0.25, 0.25], **APPROX)
    assert out[1].tolist() == pytest.approx([0.6, 0.2, 0.2, 0.0], **APPROX)


def test_class_distribution_accepts_1d_and_float32():
    # [2, 2, 4] / 8 = [0.25, 0.25, 0.5]
    out = class_distribution(np.array([2.0, 2.0, 4.0], dtype=np.float32))
    assert out.shape == (3,)
    assert out.tolist() == pytest.approx([0.25, 0.25, 0.5], **APPROX)


def test_class_distribution_rejects_negative_and_bad_shape():
    with pytest.raises(ValueError, match="non-negative"):
        class_distribution(np.array([[0.5, -0.1]]))
    with pytest.raises(ValueError, match="shape"):
        class_distribution(np.zeros((2, 2, 2)))


# --------------------------------------------------------------------------- least_confidence


def test_least_confidence_three_classes():
    # (1 - 0.6) * 3 / 2 = 0.4 * 1.5 = 0.6
    assert least_confidence(np.array([[0.6, 0.3, 0.1]])).tolist() == pytest.approx([0.6], **APPROX)


def test_least_confidence_binary():
    # (1 - 0.7) * 2 / 1 = 0.6
    assert least_confidence(np.array([[0.7, 0.3]])).tolist() == pytest.approx([0.6], **APPROX)


def test_least_confidence_uniform_is_one_and_one_hot_is_zero():
    # uniform over 4: (1 - 0.25) * 4 / 3 = 1.0; one-hot: (1 - 1) * ... = 0.0
    out = least_confidence(np.array([[0.25, 0.25, 0.25, 0.25], [0.0, 1.0, 0.0, 0.0]]))
    assert out.tolist() == pytest.approx([1.0, 0.0], **APPROX)


def test_least_confidence_single_class_is_zero():
    assert least_confidence(np.array([[1.0], [1.0]])).tolist() == [0.0, 0.0]


def test_least_confidence_rejects_1d():
    with pytest.raises(ValueError, match=r"\(n, k\)"):
        least_confidence(np.array([0.5, 0.5]))


# --------------------------------------------------------------------------- entropy


def test_entropy_binary_uniform_is_one():
    # -(0.5 ln 0.5 + 0.5 ln 0.5) / ln 2 = ln 2 / ln 2 = 1.0
    assert entropy(np.array([[0.5, 0.5]])).tolist() == pytest.approx([1.0], **APPROX)


def test_entropy_uniform_over_five_is_one():
    # ln 5 / ln 5 = 1.0
    assert entropy(np.full((1, 5), 0.2)).tolist() == pytest.approx([1.0], **APPROX)


def test_entropy_one_hot_is_zero_without_nan():
    # 1 * ln 1 = 0 and 0 * ln 0 := 0
    out = entropy(np.array([[0.0, 1.0, 0.0]]))
    assert not np.isnan(out).any()
    assert out.tolist() == pytest.approx([0.0], **APPROX)


def test_entropy_half_half_over_four_classes():
    # H = ln 2 (two classes at 0.5, two at 0), max = ln 4 = 2 ln 2 -> 0.5
    assert entropy(np.array([[0.5, 0.5, 0.0, 0.0]])).tolist() == pytest.approx([0.5], **APPROX)


def test_entropy_quarter_quarter_half():
    # H = -(2 * 0.25 ln 0.25 + 0.5 ln 0.5) = 0.5 * ln 4 + 0.5 * ln 2 = 1.5 ln 2 = 1.0397208
    # / ln 3 = 1.0397208 / 1.0986123 = 0.9463946
    assert entropy(np.array([[0.25, 0.25, 0.5]])).tolist() == pytest.approx([0.9463946], abs=1e-6)


def test_entropy_single_class_is_zero():
    assert entropy(np.array([[1.0]])).tolist() == [0.0]


# --------------------------------------------------------------------------- margin


def test_margin_three_classes():
    # 1 - (0.6 - 0.3) = 0.7
    assert margin(np.array([[0.6, 0.3, 0.1]])).tolist() == pytest.approx([0.7], **APPROX)


def test_margin_unsorted_row():
    # top1 = 0.6, top2 = 0.3 wherever they sit: 1 - 0.3 = 0.7
    assert margin(np.array([[0.1, 0.3, 0.6]])).tolist() == pytest.approx([0.7], **APPROX)


def test_margin_tie_is_one_and_one_hot_is_zero():
    # tie: 1 - (0.5 - 0.5) = 1.0; one-hot: 1 - (1 - 0) = 0.0
    out = margin(np.array([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]))
    assert out.tolist() == pytest.approx([1.0, 0.0], **APPROX)


def test_margin_single_class_is_zero():
    assert margin(np.array([[1.0]])).tolist() == [0.0]


def test_region_measures_on_empty_batch():
    empty = np.zeros((0, 3))
    assert least_confidence(empty).shape == (0,)
    assert entropy(empty).shape == (0,)
    assert margin(empty).shape == (0,)


# --------------------------------------------------------------------------- confidence_variance


def test_confidence_variance_two_values():
    # mean 0.5, var = (0.3^2 + 0.3^2) / 2 = 0.09, * 4 = 0.36
    out = confidence_variance(np.array([0.2, 0.8]))
    assert type(out) is float
    assert out == pytest.approx(0.36, **APPROX)


def test_confidence_variance_extremes():
    # [0, 1]: var 0.25 * 4 = 1.0; constant values: 0.0
    assert confidence_variance(np.array([0.0, 1.0])) == pytest.approx(1.0, **APPROX)
    assert confidence_variance(np.array([0.4, 0.4, 0.4])) == pytest.approx(0.0, **APPROX)


def test_confidence_variance_population_not_sample():
    # [0.2, 0.4, 0.6]: mean 0.4, population var = (0.04 + 0 + 0.04) / 3 = 0.026667, * 4 = 0.106667
    # (the sample variance would give 0.04 * 4 = 0.16)
    assert confidence_variance(np.array([0.2, 0.4, 0.6])) == pytest.approx(0.1066667, abs=1e-6)


def test_confidence_variance_fewer_than_two_regions():
    assert confidence_variance(np.array([0.9])) == 0.0
    assert confidence_variance(np.array([])) == 0.0


# --------------------------------------------------------------------------- detection_count


def test_detection_count_values():
    # 0/5 = 0; 5/10 = 0.5; 15/20 = 0.75; 1/(1+1) = 0.5
    assert detection_count(0, 5.0) == 0.0
    assert detection_count(5, 5.0) == pytest.approx(0.5, **APPROX)
    assert detection_count(15, 5.0) == pytest.approx(0.75, **APPROX)
    assert detection_count(1, 1.0) == pytest.approx(0.5, **APPROX)
    assert type(detection_count(3, 5.0)) is float


def test_detection_count_rejects_bad_half_saturation():
    with pytest.raises(ValueError, match="half_saturation"):
        detection_count(3, 0.0)
    with pytest.raises(ValueError, match="half_saturation"):
        detection_count(3, -1.0)


# --------------------------------------------------------------------------- mean / maximum / topk_sum


def test_mean_maximum_topk_sum():
    v = np.array([0.2, 0.9, 0.4])
    # mean (0.2 + 0.9 + 0.4) / 3 = 0.5; max 0.9; top-2 0.9 + 0.4 = 1.3
    assert mean(v) == pytest.approx(0.5, **APPROX)
    assert maximum(v) == pytest.approx(0.9, **APPROX)
    assert topk_sum(v, 2) == pytest.approx(1.3, **APPROX)
    assert type(mean(v)) is float and type(maximum(v)) is float and type(topk_sum(v, 2)) is float


def test_topk_sum_fewer_than_k_sums_all():
    # 0.9 + 0.6 = 1.5
    assert topk_sum(np.array([0.6, 0.9]), 5) == pytest.approx(1.5, **APPROX)


def test_reducers_on_empty_are_zero():
    empty = np.array([])
    assert mean(empty) == 0.0
    assert maximum(empty) == 0.0
    assert topk_sum(empty, 3) == 0.0


def test_topk_sum_rejects_bad_k():
    with pytest.raises(ValueError, match="k"):
        topk_sum(np.array([0.1]), 0)


# --------------------------------------------------------------------------- aggregate


def test_aggregate_topk_divides_by_k_even_with_fewer_regions():
    # (0.9 + 0.6) / 3 = 0.5
    assert aggregate(np.array([0.9, 0.6]), "topk_sum", 3) == pytest.approx(0.5, **APPROX)


def test_aggregate_topk_keeps_only_k_largest():
    # top-3 of [0.9, 0.0, 0.6, 0.3] = 0.9 + 0.6 + 0.3 = 1.8, / 3 = 0.6
    assert aggregate(np.array([0.9, 0.0, 0.6, 0.3]), "topk_sum", 3) == pytest.approx(0.6, **APPROX)


def test_aggregate_topk_more_uncertain_objects_worth_more():
    # one uncertain object: 1.0 / 3 = 0.3333; three: 3.0 / 3 = 1.0
    one = aggregate(np.array([1.0]), "topk_sum", 3)
    three = aggregate(np.array([1.0, 1.0, 1.0]), "topk_sum", 3)
    assert one == pytest.approx(0.3333333, abs=1e-6)
    assert three == pytest.approx(1.0, **APPROX)


def test_aggregate_mean_and_max():
    v = np.array([0.1, 0.5, 0.3])
    # mean 0.9 / 3 = 0.3; max 0.5
    assert aggregate(v, "mean", 3) == pytest.approx(0.3, **APPROX)
    assert aggregate(v, "max", 3) == pytest.approx(0.5, **APPROX)


def test_aggregate_empty_and_unknown_method():
    assert aggregate(np.array([]), "topk_sum", 3) == 0.0
    with pytest.raises(ValueError, match="median"):
        aggregate(np.array([0.1]), "median", 3)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- combine


def test_combine_weighted_mean():
    # (3 * 0.8 + 1 * 0.2) / (3 + 1) = 2.6 / 4 = 0.65
    assert combine({"entropy": 0.8, "margin": 0.2}, {"entropy": 3.0, "margin": 1.0}) == pytest.approx(
        0.65, **APPROX
    )


def test_combine_renormalises_over_present_components():
    # margin is weighted but absent: only entropy counts -> 0.8 (not 0.8 * 1/4 = 0.2)
    assert combine({"entropy": 0.8}, {"entropy": 1.0, "margin": 3.0}) == pytest.approx(0.8, **APPROX)


def test_combine_ignores_zero_weight_and_unweighted_components():
    # margin weight 0 and least_confidence has no weight: only entropy -> 0.4
    out = combine(
        {"entropy": 0.4, "margin": 1.0, "least_confidence": 1.0},
        {"entropy": 2.0, "margin": 0.0},
    )
    assert out == pytest.approx(0.4, **APPROX)


def test_combine_nothing_to_combine_is_zero():
    assert combine({}, {"entropy": 1.0}) == 0.0
    assert combine({"entropy": 0.7}, {"entropy": 0.0}) == 0.0
    assert combine({"entropy": 0.7}, {}) == 0.0


def test_combine_clips_to_unit_interval():
    assert combine({"entropy": 1.7}, {"entropy": 1.0}) == 1.0
    assert combine({"entropy": -0.3}, {"entropy": 1.0}) == 0.0


def test_combine_negative_weight_names_it():
    with pytest.raises(ValueError, match="margin"):
        combine({"entropy": 0.5, "margin": 0.5}, {"entropy": 1.0, "margin": -0.5})


# --------------------------------------------------------------------------- UncertaintyConfig


def test_config_rejects_unknown_and_negative_weights():
    with pytest.raises(ValueError, match="entropie"):
        UncertaintyConfig(weights={"entropie": 1.0})
    with pytest.raises(ValueError, match="margin"):
        UncertaintyConfig(weights={"margin": -1.0})
    with pytest.raises(ValueError, match="top_k"):
        UncertaintyConfig(weights={"margin": 1.0}, top_k=0)


# --------------------------------------------------------------------------- detection_uncertainty


def test_detection_no_detection_gives_floor():
    cfg = UncertaintyConfig(weights={"entropy": 1.0}, empty_floor=0.5)
    out = detection_uncertainty(None, np.array([]), cfg)
    assert out == ImageUncertainty(value=0.5, components={}, n_regions=0, empty=True)


def test_detection_no_detection_uses_configured_floor_with_class_scores():
    cfg = UncertaintyConfig(weights={"entropy": 1.0}, empty_floor=0.3)
    out = detection_uncertainty(np.zeros((0, 4)), np.zeros(0), cfg)
    assert out.value == pytest.approx(0.3, **APPROX)
    assert out.empty is True


def test_detection_single_region_least_confidence():
    # one region [0.6, 0.3, 0.1] with conf 0.6: background column 1 - 0.6 = 0.4 -> [0.6, 0.3, 0.1, 0.4] / 1.4
    # = [0.428571, 0.214286, 0.071429, 0.285714]; k = 4: least confidence (1 - 0.428571) * 4/3 = 0.761905
    cfg = UncertaintyConfig(weights={"least_confidence": 1.0}, aggregation="max")
    out = detection_uncertainty(np.array([[0.6, 0.3, 0.1]]), np.array([0.6]), cfg)
    assert out.value == pytest.approx(0.761905, abs=1e-6)
    assert out.n_regions == 1 and out.empty is False
    assert type(out.value) is float


def test_detection_two_regions_all_components():
    # with the background column 1 - conf (k = 3):
    # region A [0.8, 0.0, 0.2] -> p = [0.8, 0, 0.2]; region B [0.4, 0.4, 0.6] / 1.4 -> [0.285714, 0.285714, 0.428571]
    # least confidence: A (1 - 0.8) * 1.5 = 0.3, B (1 - 0.428571) * 1.5 = 0.857143; topk_sum/3 = 0.385714
    # entropy / ln 3: A (0.178515 + 0.321888) / 1.098612 = 0.455486; B 1.078993 / 1.098612 = 0.982142;
    #   topk_sum/3 = 0.479209
    # margin: A 1 - (0.8 - 0.2) = 0.4, B 1 - (0.428571 - 0.285714) = 0.857143; topk_sum/3 = 0.419048
    # confidences [0.8, 0.4]: mean 0.6, var (0.04 + 0.04) / 2 = 0.04, * 4 = 0.16
    # detection_count 2 / (2 + 5) = 0.285714
    # combine least_confidence (w 1) + confidence_variance (w 1): (0.385714 + 0.16) / 2 = 0.272857
    cfg = UncertaintyConfig(
        weights={"least_confidence": 1.0, "confidence_variance": 1.0}, aggregation="topk_sum", top_k=3
    )
    out = detection_uncertainty(np.array([[0.8, 0.0], [0.4, 0.4]]), np.array([0.8, 0.4]), cfg)
    assert out.components["least_confidence"] == pytest.approx(0.385714, abs=1e-6)
    assert out.components["entropy"] == pytest.approx(0.479209, abs=1e-6)
    assert out.components["margin"] == pytest.approx(0.419048, abs=1e-6)
    assert out.components["confidence_variance"] == pytest.approx(0.16, **APPROX)
    assert out.components["detection_count"] == pytest.approx(0.2857143, abs=1e-6)
    assert out.value == pytest.approx(0.272857, abs=1e-6)
    assert out.n_regions == 2
    assert all(type(v) is float for v in out.components.values())


def test_detection_without_class_scores_uses_binary_confidence():
    # conf 0.9 -> [0.9, 0.1]: least confidence (1 - 0.9) * 2 = 0.2; margin 1 - (0.9 - 0.1) = 0.2
    # conf 0.5 -> [0.5, 0.5]: entropy 1.0
    cfg_lc = UncertaintyConfig(weights={"least_confidence": 1.0}, aggregation="mean")
    cfg_m = UncertaintyConfig(weights={"margin": 1.0}, aggregation="mean")
    cfg_h = UncertaintyConfig(weights={"entropy": 1.0}, aggregation="mean")
    assert detection_uncertainty(None, np.array([0.9]), cfg_lc).value == pytest.approx(0.2, **APPROX)
    assert detection_uncertainty(None, np.array([0.9]), cfg_m).value == pytest.approx(0.2, **APPROX)
    assert detection_uncertainty(None, np.array([0.5]), cfg_h).value == pytest.approx(1.0, **APPROX)


def test_detection_single_class_model_falls_back_to_confidence():
    # k == 1: the class score is the confidence, conf 0.5 -> [0.5, 0.5] -> least confidence 1.0
    cfg = UncertaintyConfig(weights={"least_confidence": 1.0}, aggregation="max")
    out = detection_uncertainty(np.array([[0.5]]), np.array([0.5]), cfg)
    assert out.value == pytest.approx(1.0, **APPROX)


def test_detection_confident_image_scores_lower_than_ambiguous():
    cfg = UncertaintyConfig(weights={"least_confidence": 1.0, "entropy": 1.0, "margin": 1.0}, top_k=3)
    # confident: one-hot-ish rows with high confidence -> every per-region measure small
    confident = detection_uncertainty(
        np.array([[0.95, 0.01, 0.0], [0.0, 0.9, 0.02]]), np.array([0.95, 0.9]), cfg
    )
    # ambiguous: near-tied rows -> per-region measures near 1
    ambiguous = detection_uncertainty(np.array([[0.4, 0.4, 0.1], [0.3, 0.3, 0.3]]), np.array([0.4, 0.3]), cfg)
    assert confident.value < 0.15
    assert ambiguous.value > 0.5
    assert confident.value < ambiguous.value


def test_detection_accepts_float32():
    # same as the single-region case above, in float32: 0.761905 (float32 rounding -> loose tolerance)
    cfg = UncertaintyConfig(weights={"least_confidence": 1.0}, aggregation="max")
    out = detection_uncertainty(
        np.array([[0.6, 0.3, 0.1]], dtype=np.float32), np.array([0.6], dtype=np.float32), cfg
    )
    assert out.value == pytest.approx(0.761905, abs=1e-6)
    assert type(out.value) is float


def test_detection_half_confident_box_is_the_uncertain_one():
    # one class score per box, 3 classes: [c, 0, 0] + background 1 - c
    # c = 0.5: [0.5, 0, 0, 0.5] -> least confidence (1 - 0.5) * 4/3 = 0.666667 (object or not: a coin toss)
    # c = 0.95: [0.95, 0, 0, 0.05] -> (1 - 0.95) * 4/3 = 0.066667
    # c = 0.1: [0.1, 0, 0, 0.9] -> (1 - 0.9) * 4/3 = 0.133333 (confidently background)
    cfg = UncertaintyConfig(weights={"least_confidence": 1.0}, aggregation="max")

    def lc(c: float) -> float:
        return detection_uncertainty(np.array([[c, 0.0, 0.0]]), np.array([c]), cfg).value

    assert lc(0.5) == pytest.approx(0.666667, abs=1e-6)
    assert lc(0.95) == pytest.approx(0.066667, abs=1e-6)
    assert lc(0.1) == pytest.approx(0.133333, abs=1e-6)


def test_detection_shape_mismatch_raises():
    cfg = UncertaintyConfig(weights={"entropy": 1.0})
    with pytest.raises(ValueError, match="rows"):
        detection_uncertainty(np.array([[0.5, 0.5], [0.2, 0.8]]), np.array([0.5]), cfg)
    with pytest.raises(ValueError, match=r"\(n, k\)"):
        detection_uncertainty(np.array([0.5, 0.5]), np.array([0.5, 0.5]), cfg)
    with pytest.raises(ValueError, match=r"\(n,\)"):
        detection_uncertainty(None, np.array([[0.5]]), cfg)


def test_detection_rejects_confidence_out_of_range():
    cfg = UncertaintyConfig(weights={"entropy": 1.0})
    with pytest.raises(ValueError, match="confidences"):
        detection_uncertainty(None, np.array([1.5]), cfg)


# --------------------------------------------------------------------------- classification_uncertainty


def test_classification_components():
    # [0.6, 0.3, 0.1]: least confidence 0.6, margin 0.7
    cfg = UncertaintyConfig(weights={"margin": 1.0})
    out = classification_uncertainty(np.array([0.6, 0.3, 0.1]), cfg)
    assert set(out.components) == {"least_confidence", "entropy", "margin"}
    assert out.components["least_confidence"] == pytest.approx(0.6, **APPROX)
    assert out.components["margin"] == pytest.approx(0.7, **APPROX)
    assert out.value == pytest.approx(0.7, **APPROX)
    assert out.empty is False


def test_classification_ignores_variance_and_count_weights():
    # variance/count do not apply: weights renormalised over least_confidence alone -> 0.6
    # (if they counted as 0, the value would be 1 * 0.6 / 11 = 0.0545)
    cfg = UncertaintyConfig(
        weights={"least_confidence": 1.0, "confidence_variance": 5.0, "detection_count": 5.0}
    )
    out = classification_uncertainty(np.array([0.6, 0.3, 0.1]), cfg)
    assert out.value == pytest.approx(0.6, **APPROX)


def test_classification_uniform_and_one_hot():
    cfg = UncertaintyConfig(weights={"least_confidence": 1.0, "entropy": 1.0, "margin": 1.0})
    # uniform over 4: every component 1.0 -> 1.0; one-hot: every component 0.0 -> 0.0
    assert classification_uncertainty(np.full(4, 0.25), cfg).value == pytest.approx(1.0, **APPROX)
    assert classification_uncertainty(np.array([0.0, 0.0, 1.0]), cfg).value == pytest.approx(0.0, **APPROX)


def test_classification_rejects_2d():
    cfg = UncertaintyConfig(weights={"entropy": 1.0})
    with pytest.raises(ValueError, match="probs"):
        classification_uncertainty(np.array([[0.5, 0.5]]), cfg)


# --------------------------------------------------------------------------- task_score


def test_task_score():
    # 1 - 0.25 = 0.75; clipped outside [0, 1]
    assert task_score(0.25) == pytest.approx(0.75, **APPROX)
    assert task_score(0.0) == 1.0
    assert task_score(1.0) == 0.0
    assert task_score(1.5) == 0.0
    assert task_score(-0.2) == 1.0
    assert type(task_score(np.float32(0.25))) is float


def test_task_score_rejects_nan():
    with pytest.raises(ValueError):
        task_score(math.nan)
