"""The label bias: the fit against closed forms, scoring, and what a calibrated objective returns."""

import numpy as np
import pytest

from blackbox.calibration import LabelBias, fit_label_bias, score_with_bias


def test_the_fit_is_the_closed_form_for_constant_logits():
    """With the same logits for every example, the unpenalised optimum makes the
    softmax the label frequencies: b_c = log(freq_c) - logit_c, up to a constant."""
    labels = np.array([0, 0, 0, 1, 2, 2])
    logits = np.tile(np.array([2.0, -1.0, 0.5]), (1, len(labels), 1))
    bias = fit_label_bias(logits, labels, l2=0.0)[0]
    expected = np.log([3 / 6, 1 / 6, 2 / 6]) - logits[0, 0]
    np.testing.assert_allclose(bias, expected - expected.mean(), atol=1e-6)


def test_the_bias_removes_a_lean_towards_one_word():
    """Logits that separate the classes but favour class 0 by 3 everywhere: the fit
    takes the lean out, and every example is then right."""
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 16)
    signal = np.where(labels[:, None] == np.arange(2)[None, :], 1.0, -1.0) + 0.1 * rng.standard_normal((32, 2))
    logits = (signal + np.array([3.0, 0.0]))[None]
    before = score_with_bias(logits, labels, np.zeros((1, 2)))[1][0]
    bias = fit_label_bias(logits, labels)
    ce, accuracy = score_with_bias(logits, labels, bias)
    assert before == 0.5 and accuracy[0] == 1.0
    assert bias[0, 0] < -1.0 < 1.0 < bias[0, 1]
    assert ce[0] < score_with_bias(logits, labels, np.zeros((1, 2)))[0][0]


def test_the_ridge_shrinks_the_offsets_and_each_candidate_has_its_own():
    labels = np.array([0, 1, 1, 1])
    logits = np.stack([np.zeros((4, 2)), np.tile([1.0, 0.0], (4, 1))])
    loose, tight = fit_label_bias(logits, labels, l2=0.0), fit_label_bias(logits, labels, l2=1.0)
    assert np.all(np.abs(tight) < np.abs(loose))
    np.testing.assert_allclose(loose.sum(axis=1), 0, atol=1e-9)
    # The second candidate's logits lean to class 0 by 1: its offsets differ by that lean.
    np.testing.assert_allclose(loose[1] - loose[0], [-0.5, 0.5], atol=1e-6)


def test_scores_are_mean_cross_entropy_and_accuracy():
    logits = np.log(np.array([[[0.7, 0.3], [0.2, 0.8], [0.6, 0.4]]]))
    labels = np.array([0, 1, 1])
    ce, accuracy = score_with_bias(logits, labels, np.zeros((1, 2)))
    np.testing.assert_allclose(ce, [-(np.log(0.7) + np.log(0.8) + np.log(0.4)) / 3])
    np.testing.assert_allclose(accuracy, [2 / 3])


def test_a_slice_of_a_split_is_scored_against_its_own_labels():
    scorer = LabelBias({"train": np.array([0, 1]), "test": np.array([0, 1, 1, 0])})
    logits = np.array([[[0.0, 1.0], [1.0, 0.0]]])  # examples 2 and 3 of test: labels 1, 0
    _, accuracy = scorer.score("test", logits, np.zeros((1, 2)), start=2)
    assert accuracy[0] == 1.0


def test_shapes_that_do_not_match_the_labels_are_refused():
    with pytest.raises(ValueError, match=r"\(P, N, C\) logits for 3 labels"):
        fit_label_bias(np.zeros((1, 2, 2)), np.array([0, 1, 0]))
