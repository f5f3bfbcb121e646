"""Label bias: one offset per class added to the verbalizer logits, fitted on train.

A small model read through a template leans towards some label words whatever the text
(Zhao et al. 2021, "Calibrate before use"): on the bundled SmolLM2 the template alone
answers one class for most sentence pairs, and the fourteen DBPedia words are far from
equally likely. The offsets that minimise the train cross-entropy of a candidate's logits
take that lean out, so the search is judged on how well a candidate separates the
classes rather than on how it happens to weigh the label words. The fit is a few Newton
steps on a convex loss of C numbers per candidate, made by the client from the logits the
server returns: it costs no API call.
"""

from __future__ import annotations

import numpy as np

__all__ = ["DEFAULT_L2", "LabelBias", "fit_label_bias", "log_softmax", "score_with_bias"]

# The ridge on the offsets: with 16 examples a class, an unpenalised fit chases the last
# few examples (measured on the bundled model: notes in docs/results.md).
DEFAULT_L2 = 0.01
NEWTON_STEPS = 8


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def fit_label_bias(logits: np.ndarray, labels: np.ndarray, l2: float = DEFAULT_L2) -> np.ndarray:
    """(P, C) offsets minimising mean CE(logits + b) + l2/2 |b|^2 for each of the P
    candidates' (P, N, C) logits on examples with these (N,) labels."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 3 or logits.shape[1] != len(labels):
        raise ValueError(f"expected (P, N, C) logits for {len(labels)} labels, got shape {logits.shape}")
    p, n, c = logits.shape
    onehot = np.eye(c)[np.asarray(labels)]
    bias = np.zeros((p, c))
    # The loss is invariant to adding one constant to every offset: the ridge (and a
    # floor for l2 = 0) keeps the Hessian invertible and picks the zero-sum solution.
    ridge = max(l2, 1e-6) * np.eye(c)
    for _ in range(NEWTON_STEPS):
        probs = np.exp(log_softmax(logits + bias[:, None, :]))
        grad = (probs - onehot).mean(axis=1) + l2 * bias
        hess = (np.einsum("pnc,cd->pcd", probs, np.eye(c)) - np.einsum("pnc,pnd->pcd", probs, probs)) / n
        bias -= np.linalg.solve(hess + ridge, grad[..., None])[..., 0]
    return bias - bias.mean(axis=1, keepdims=True)


def score_with_bias(logits: np.ndarray, labels: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(P,) mean CE and (P,) accuracy of (P, N, C) logits shifted by (P, C) offsets."""
    shifted = np.asarray(logits, dtype=np.float64) + np.asarray(bias, dtype=np.float64)[:, None, :]
    labels = np.asarray(labels)
    log_probs = log_softmax(shifted)
    ce = -np.take_along_axis(log_probs, labels[None, :, None], axis=-1)[..., 0].mean(axis=1)
    accuracy = (shifted.argmax(axis=-1) == labels[None, :]).mean(axis=1)
    return ce, accuracy


class LabelBias:
    """The offsets of a calibrated run: fitted per candidate on the train split's logits,
    then applied to that candidate's logits on any split."""

    def __init__(self, labels: dict[str, np.ndarray], l2: float = DEFAULT_L2):
        self.labels = {split: np.asarray(values) for split, values in labels.items()}
        self.l2 = l2

    def fit(self, train_logits: np.ndarray) -> np.ndarray:
        return fit_label_bias(train_logits, self.labels["train"], self.l2)

    def score(self, split: str, logits: np.ndarray, bias: np.ndarray, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(P,) CE and accuracy of the split's examples from `start` on, as many as `logits` holds."""
        return score_with_bias(logits, self.labels[split][start:start + logits.shape[1]], bias)
