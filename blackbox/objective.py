"""Candidates in, losses out: the only thing an optimizer sees of the backbone."""

from __future__ import annotations

import dataclasses

import numpy as np

from blackbox.calibration import LabelBias
from blackbox.client import Gradients, Scores, Session

LOSSES = ("ce", "hinge")


class Objective:
    """Scores a population on one split of a session with one loss."""

    def __init__(self, session: Session, split: str = "train", loss: str = "ce",
                 label_bias: LabelBias | None = None):
        """With `label_bias`, each candidate is scored with the offsets fitted to its own
        logits on `split` (CE only); the offsets come back as the scores' `label_bias`."""
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; choose from {', '.join(LOSSES)}")
        if label_bias is not None and loss != "ce":
            raise ValueError("a label bias is fitted to the cross-entropy; it does not go with the hinge loss")
        self.session = session
        self.split = split
        self.loss = loss
        self.label_bias = label_bias

    def __call__(self, candidates: np.ndarray) -> tuple[np.ndarray, Scores]:
        if self.label_bias is not None:
            scores = self.session.evaluate(self.split, candidates, return_logits=True)
            bias = self.label_bias.fit(scores.logits)
            ce, accuracy = self.label_bias.score(self.split, scores.logits, bias)
            return ce, dataclasses.replace(scores, ce_loss=ce, accuracy=accuracy, label_bias=bias)
        scores = self.session.evaluate(self.split, candidates)
        losses = scores.ce_loss if self.loss == "ce" else scores.hinge_loss
        return losses.astype(np.float64), scores

    def with_gradients(self, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray, Gradients]:
        """Losses and d loss / d z of each candidate (servers that allow gradients only)."""
        result = self.session.gradient(self.split, candidates, loss=self.loss)
        return result.loss.astype(np.float64), result.grad.astype(np.float64), result
