"""Plots of runs: train loss and dev accuracy against API calls."""

from __future__ import annotations

import os
from pathlib import Path

from blackbox.runlog import read_log


def _loss_and_accuracy_axes():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    figure, (loss_axis, acc_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for axis in (loss_axis, acc_axis):
        axis.set_xlabel("API calls")
    return plt, figure, loss_axis, acc_axis


def _save(plt, figure, axes, out_png: str | os.PathLike, title: str) -> Path:
    for axis in axes:
        axis.legend()
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    out = Path(out_png)
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return out


def plot_curve(log_path: str | os.PathLike, out_png: str | os.PathLike, title: str = "") -> Path:
    """One run: population mean and best train loss, dev checks and the best so far."""
    plt, figure, loss_axis, acc_axis = _loss_and_accuracy_axes()
    records = read_log(log_path)
    calls = [r["api_calls"] for r in records]
    loss_axis.plot(calls, [r["train_loss_mean"] for r in records], label="population mean", alpha=0.6)
    loss_axis.plot(calls, [r["train_loss"] for r in records], label="generation best")
    loss_axis.set_ylabel("train loss")
    checked = [r for r in records if r.get("dev_acc") is not None]
    acc_axis.plot([r["api_calls"] for r in checked], [r["dev_acc"] for r in checked], ".", alpha=0.5,
                  label="generation best on dev")
    acc_axis.step([r["api_calls"] for r in checked], [r["best_dev_acc"] for r in checked], where="post",
                  label="best so far")
    acc_axis.set_ylabel("dev accuracy")
    return _save(plt, figure, (loss_axis, acc_axis), out_png, title)


def plot_comparison(logs: dict[str, Path], out_png: str | os.PathLike, title: str = "") -> Path:
    """One line per run: best train loss per generation and best dev accuracy so far."""
    plt, figure, loss_axis, acc_axis = _loss_and_accuracy_axes()
    for name, log_path in logs.items():
        records = read_log(log_path)
        calls = [r["api_calls"] for r in records]
        loss_axis.plot(calls, [r["train_loss"] for r in records], label=name)
        acc_axis.step(calls, [r["best_dev_acc"] for r in records], where="post", label=name)
    loss_axis.set_ylabel("train loss (generation best)")
    acc_axis.set_ylabel("best dev accuracy so far")
    return _save(plt, figure, (loss_axis, acc_axis), out_png, title)
