"""Candidates in, losses out: the only thing an optimizer sees of the backbone."""

from __future__ import annotations

import numpy as np

from blackbox.client import Gradients, Scores, Session

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

    def with_gradients(self, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray, Gradients]:
        """Losses and d loss / d z of each candidate (servers that allow gradients only)."""
        result = self.session.gradient(self.split, candidates, loss=self.loss)
        return result.loss.astype(np.float64), result.grad.astype(np.float64), result
