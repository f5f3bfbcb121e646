"""Candidates in, losses out: the only thing an optimizer sees of the backbone."""

from __future__ import annotations

import numpy as np

from blackbox.client import Scores, Session

LOSSES = ("ce", "hinge")


class Objective:
    """Scores a population on one split of a session with one loss."""

    def __init__(self, session: Session, split: str = "train", loss: str = "ce"):
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; choose from {', '.join(LOSSES)}")
        self.session = session
        self.split = split
        self.loss = loss

    def __call__(self, candidates: np.ndarray) -> tuple[np.ndarray, Scores]:
        scores = self.session.evaluate(self.split, candidates)
        losses = scores.ce_loss if self.loss == "ce" else scores.hinge_loss
        return losses.astype(np.float64), scores
