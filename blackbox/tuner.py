"""One black-box tuning run: task -> session -> ask/evaluate/tell loop -> test -> files.

The loop owns the bookkeeping the objective must not do: counting API calls, checking
the generation's best candidate on dev, keeping the best-on-dev z, logging, and the
final test evaluation of that z.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from blackbox.client import BackboneClient, BackboneError, DeltaSpec, Session
from blackbox.objective import Objective
from blackbox.optim import make_optimizer, optimizer_class
from blackbox.optim.blocks import DivideAndConquer
from blackbox.report import plot_curve
from blackbox.runlog import RunLog
from blackbox.tasks import get_task, load_split, place_prompt

# Delta kinds that put vectors at {prompt}; the others change modules and take no prompt.
PROMPT_KINDS = ("prompt", "deep-prompt")
MIXES = ("", "unipelt", "adamix")
# "joint": one optimizer searches all of z; "divide-and-conquer": one optimizer per block
# of z (a per-layer deep prompt's layers, a combination's parts), taking turns (BBTv2).
STRATEGIES = ("joint", "divide-and-conquer")

# Test splits are scored in slices so that long evaluations show progress.
EVAL_SLICE = 256


@dataclass
class TuneConfig:
    task: str = "sst2"
    seed: int = 13
    k: int = 16
    data_dir: str | None = None
    budget: int = 8000
    popsize: int = 20
    dim: int = 500
    prompt_length: int = 50
    delta: str = "prompt"
    # Weight kinds: the rank of low-rank ones (0: the kind's default) and the module-name
    # suffixes they change, comma-separated ("": the kind's default).
    rank: int = 0
    targets: str = ""
    # "unipelt" (per-layer gates on every part of `delta`) or "adamix" (copies of one
    # weight kind, routed per example in search and averaged for dev and test); "": none.
    mix: str = ""
    adamix_copies: int = 4
    # Combinations: each part's share of z, comma-separated in kind order ("": equal shares).
    part_dims: str = ""
    placement: str = "before"
    projection: str = "normal"
    optimizer: str = "cma"
    strategy: str = "joint"
    # divide-and-conquer: generations of one block's optimizer before the next block's turn.
    turn_generations: int = 1
    sigma: float = 1.0
    alpha: float = 1.0
    bound: float | None = None
    loss: str = "ce"
    dev_every: int = 1
    # Stop when the best dev accuracy has not improved for this many generations (0: never).
    patience: int = 0
    # Stop starting generations after this many seconds of the run (0: no limit).
    max_wall_s: float = 0.0
    truncate: bool = False
    out: str = "runs/tune"

    def __post_init__(self):
        for name in ("budget", "popsize", "dim", "prompt_length", "dev_every", "k", "turn_generations"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        generation = optimizer_class(self.optimizer).fixed_popsize or self.popsize
        if self.budget < generation:
            raise ValueError(f"budget {self.budget} is smaller than one generation (popsize {generation})")
        if not self.sigma > 0 or not self.alpha > 0:
            raise ValueError("sigma and alpha must be > 0")
        if self.patience < 0 or self.max_wall_s < 0:
            raise ValueError("patience and max-wall-s must be >= 0 (0 turns them off)")
        if self.bound is not None and not self.bound > 0:
            raise ValueError("bound must be > 0")
        if self.mix not in MIXES:
            raise ValueError(f"unknown mix {self.mix!r}; choose from {', '.join(m for m in MIXES if m)}")
        if self.part_dims:
            if "+" not in self.delta:
                raise ValueError(f"part-dims split z among the parts of a combination (KIND+KIND), not "
                                 f"{self.delta!r}")
            if not all(part.strip().isdigit() and int(part) >= 1 for part in self.part_dims.split(",")):
                raise ValueError(f"part-dims must be sizes >= 1 separated by commas, got {self.part_dims!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose from {', '.join(STRATEGIES)}")
        if self.strategy == "divide-and-conquer":
            method = optimizer_class(self.optimizer)
            if method.uses_gradients or method.fixed_popsize:
                raise ValueError(f"divide-and-conquer runs a population-based method per block, not "
                                 f"{self.optimizer!r}")
            if not (self.delta_kind == "deep-prompt" or "+" in self.delta or self.mix == "unipelt"):
                raise ValueError("divide-and-conquer needs z in several blocks: --delta deep-prompt (one block "
                                 "per layer) or a combination (KIND+KIND, or --mix unipelt: parts and gates); "
                                 f"{self.delta_kind!r} has one")

    @property
    def delta_kind(self) -> str:
        """The server's name for the delta: "lora", "prompt+lora", "unipelt:lora+adapter", "adamix4:adapter"."""
        if self.mix == "adamix":
            return f"adamix{self.adamix_copies}:{self.delta}"
        return f"{self.mix}:{self.delta}" if self.mix else self.delta


def evaluate_split(session: Session, split: str, z: np.ndarray, label: str, show: bool) -> tuple[float, float]:
    """Accuracy and mean CE of one candidate on a whole split, in slices with a progress bar."""
    size = session.split_sizes[split]
    correct = loss = 0.0
    with tqdm(total=size, desc=label, unit="ex", disable=not show, leave=False) as bar:
        for start in range(0, size, EVAL_SLICE):
            scores = session.evaluate(split, z[None, :], start=start, count=EVAL_SLICE)
            correct += float(scores.accuracy[0]) * scores.num_examples
            loss += float(scores.ce_loss[0]) * scores.num_examples
            bar.update(scores.num_examples)
    return correct / size, loss / size


def delta_spec(config: TuneConfig) -> DeltaSpec:
    """What the run asks the server to generate from z (also what `blackbox export` rebuilds)."""
    has_prompt = any(part in PROMPT_KINDS for part in config.delta.split("+"))
    # BBT's scaling: std(A) = alpha * std(embeddings) / (sqrt(d) * sigma0).
    return DeltaSpec(kind=config.delta_kind, prompt_length=config.prompt_length if has_prompt else 0,
                     intrinsic_dim=config.dim, projection=config.projection, seed=config.seed,
                     projection_scale=config.alpha / config.sigma, rank=config.rank,
                     targets=tuple(t.strip() for t in config.targets.split(",") if t.strip()),
                     per_layer_z=config.strategy == "divide-and-conquer" and config.delta_kind == "deep-prompt",
                     part_dims=tuple(int(part) for part in config.part_dims.split(",") if part.strip()))


def build_optimizer(config: TuneConfig, blocks: list[tuple[str, int]] | None = None):
    """The run's optimizer over z of the session's `blocks` (name, size) (default: one
    block of config.dim). Methods that plan by their total budget (nevergrad's NGOpt and
    other meta-optimizers) are told the run's budget in candidate evaluations; under
    divide-and-conquer each block's optimizer gets its share."""
    blocks = blocks or [("z", config.dim)]
    dim = sum(size for _, size in blocks)
    bounds = (-config.bound, config.bound) if config.bound else None
    plans_budget = "budget" in optimizer_class(config.optimizer).option_defaults
    if config.strategy == "divide-and-conquer":
        inner_options = {"budget": max(1, config.budget // len(blocks))} if plans_budget else None
        return DivideAndConquer(
            f"divide-and-conquer:{config.optimizer}", dim, config.popsize, config.seed, sigma0=config.sigma,
            bounds=bounds, options={"blocks": [size for _, size in blocks], "inner": config.optimizer,
                                    "turn_generations": config.turn_generations, "inner_options": inner_options},
        )
    return make_optimizer(config.optimizer, dim=dim, popsize=config.popsize, seed=config.seed,
                          sigma0=config.sigma, bounds=bounds,
                          options={"budget": config.budget} if plans_budget else None)


def resume_config(out: str, budget: int | None = None) -> TuneConfig:
    """The configuration of the run stored in `out`, with a new budget if given."""
    stored = RunLog.read_checkpoint(out)["config"]
    return TuneConfig(**{**stored, "out": out, **({"budget": budget} if budget is not None else {})})


def run_tune(config: TuneConfig, client: BackboneClient, show_progress: bool = True,
             overwrite: bool = False, resume: bool = False,
             zero_shot: dict[str, float] | None = None) -> dict[str, Any]:
    """Runs (or with `resume`, continues) the tuning run that `config` describes.

    `zero_shot` ({"test_acc", "dev_acc", "dev_loss"} of z = 0, as returned in the result
    under that key) skips re-scoring the starting point when a caller already did.
    """
    started = time.perf_counter()
    task = get_task(config.task)
    info = client.get_info()
    template = place_prompt(task.template_for(info.architecture), config.placement)
    splits = {split: load_split(task, split, seed=config.seed, k=config.k, data_dir=config.data_dir)
              for split in ("train", "dev", "test")}
    if config.mix == "adamix":
        # The server routes "train" and "*-routed" splits to copies and merges the copies
        # elsewhere: these copies give the best z's routed and merged scores on both sets.
        splits.update({"train-merged": splits["train"], "test-routed": splits["test"]})
    if optimizer_class(config.optimizer).uses_gradients and not info.gradients_enabled:
        raise ValueError(f"optimizer {config.optimizer!r} needs gradients, and the server hosting "
                         f"{info.model_name} does not allow them (start it with --allow-gradients)")
    # Checked before the run folder is touched: a refused resume loses nothing.
    checkpoint = RunLog.read_checkpoint(config.out) if resume else None
    if checkpoint is not None:
        _check_resumable(checkpoint, config, info.model_name)
        started -= checkpoint["elapsed_s"]
    delta = delta_spec(config)
    # The server checks the delta before the run folder is touched.
    session = client.create_session(splits, template, task.verbalizer, delta, truncate=config.truncate)
    try:
        # z's length and blocks are the session's (a per-layer deep prompt has one block per layer).
        optimizer = build_optimizer(config, session.z_blocks)
        if checkpoint is not None:
            optimizer.load_state_dict(checkpoint["optimizer"])
        run = RunLog(config.out, overwrite=overwrite, resume_from=checkpoint)
    except BaseException:
        with contextlib.suppress(BackboneError):
            session.close()
        raise
    run.write_config({**dataclasses.asdict(config), "template": template, "model": info.model_name,
                      "architecture": info.architecture})
    try:
        if checkpoint is not None:
            zero_shot = checkpoint["zero_shot"]
        elif zero_shot is None:
            zero = np.zeros(session.z_dim, dtype=np.float32)
            test_acc, _ = evaluate_split(session, "test", zero, "zero-shot test", show_progress)
            dev_acc, dev_loss = evaluate_split(session, "dev", zero, "zero-shot dev", False)
            zero_shot = {"test_acc": test_acc, "dev_acc": dev_acc, "dev_loss": dev_loss}
        zero_shot_test_acc = zero_shot["test_acc"]
        if checkpoint is None:
            best_dev_acc, best_dev_loss = zero_shot["dev_acc"], zero_shot["dev_loss"]
            best_z, best_generation = np.zeros(session.z_dim, dtype=np.float32), 0
            api_calls = generation = 0
            if show_progress:
                tqdm.write(f"zero-shot (z = 0): test acc {zero_shot_test_acc:.4f}, dev acc {best_dev_acc:.4f}")
        else:
            best_dev_acc, best_dev_loss = checkpoint["best_dev_acc"], checkpoint["best_dev_loss"]
            best_z, best_generation = checkpoint["best_z"], checkpoint["best_generation"]
            api_calls, generation = checkpoint["api_calls"], checkpoint["generation"]
            if show_progress:
                tqdm.write(f"resuming {config.out} after generation {generation} ({api_calls} API calls)")

        objective = Objective(session, "train", config.loss)
        # A gradient call on the train split counts as one call, like one candidate's forward.
        calls_per_generation = optimizer.popsize * optimizer.calls_per_candidate
        with tqdm(total=config.budget, initial=api_calls, desc=f"{config.task} {config.optimizer}", unit="call",
                  disable=not show_progress) as bar:
            while (stop_reason := _stop_reason(config, optimizer, api_calls + calls_per_generation, generation,
                                               best_generation, time.perf_counter() - started)) is None:
                tick = time.perf_counter()
                candidates = optimizer.ask()
                # Divide and conquer: the name of the block this generation changes.
                block = session.z_blocks[optimizer.active][0] if config.strategy != "joint" else None
                if optimizer.uses_gradients:
                    losses, gradients, scores = objective.with_gradients(candidates)
                    optimizer.tell(candidates, losses, gradients)
                else:
                    losses, scores = objective(candidates)
                    optimizer.tell(candidates, losses)
                generation += 1
                api_calls += calls_per_generation
                leader = int(np.argmin(losses))
                record = {
                    "generation": generation,
                    "api_calls": api_calls,
                    "train_loss": float(losses[leader]),
                    "train_loss_mean": float(losses.mean()),
                    "train_acc": float(scores.accuracy[leader]),
                    "dev_acc": None,
                    "dev_loss": None,
                    **({"block": block} if block is not None else {}),
                }
                if generation % config.dev_every == 0:
                    dev = session.evaluate("dev", candidates[leader][None, :])
                    dev_acc, dev_loss = float(dev.accuracy[0]), float(dev.ce_loss[0])
                    record.update(dev_acc=dev_acc, dev_loss=dev_loss)
                    if (dev_acc, -dev_loss) > (best_dev_acc, -best_dev_loss):
                        best_dev_acc, best_dev_loss = dev_acc, dev_loss
                        best_z, best_generation = candidates[leader].astype(np.float32), generation
                record.update(best_dev_acc=best_dev_acc, server_ms=scores.server_ms,
                              generation_ms=(time.perf_counter() - tick) * 1e3,
                              elapsed_s=time.perf_counter() - started)
                run.log_generation(record)
                run.write_checkpoint({
                    "config": dataclasses.asdict(config), "model": info.model_name,
                    "optimizer": optimizer.state_dict(), "generation": generation, "api_calls": api_calls,
                    "best_z": best_z, "best_dev_acc": best_dev_acc, "best_dev_loss": best_dev_loss,
                    "best_generation": best_generation, "zero_shot": zero_shot,
                    "elapsed_s": time.perf_counter() - started,
                })
                bar.update(calls_per_generation)
                bar.set_postfix(loss=f"{record['train_loss']:.3f}", dev=f"{best_dev_acc:.3f}")

        test_acc, test_loss = evaluate_split(session, "test", best_z, "test", show_progress)
        adamix = _adamix_scores(session, best_z, test_acc, show_progress) if config.mix == "adamix" else None
    finally:
        # Best effort: a server that went away must not hide the error that ended the run.
        with contextlib.suppress(BackboneError):
            session.close()
        run.close()

    result = {
        "task": task.name,
        "seed": config.seed,
        "model": info.model_name,
        "architecture": info.architecture,
        "device": info.device,
        "dtype": info.dtype,
        "delta": config.delta_kind,
        "prompt_length": delta.prompt_length,
        "rank": config.rank,
        "targets": config.targets,
        "placement": config.placement,
        "prompt_position": session.prompt_position,
        "prefix_reuse": session.prefix_reuse,
        "projection": config.projection,
        "optimizer": config.optimizer,
        "strategy": config.strategy,
        "loss": config.loss,
        "dim": config.dim,
        "z_dim": session.z_dim,
        "z_blocks": [{"name": name, "size": size} for name, size in session.z_blocks],
        "popsize": optimizer.popsize,
        "sigma": config.sigma,
        "budget": config.budget,
        "api_calls": api_calls,
        "generations": generation,
        "best_generation": best_generation,
        "best_dev_acc": best_dev_acc,
        "test_acc": test_acc,
        "test_loss": test_loss,
        "zero_shot_test_acc": zero_shot_test_acc,
        "test_examples": session.split_sizes["test"],
        "test_note": task.test_note,
        "stop_reason": stop_reason,
        "wall_s": time.perf_counter() - started,
        **({"adamix": adamix} if adamix is not None else {}),
    }
    result_path = run.write_result(result, best_z)
    plot_curve(run.log_path, run.dir / "curve.png",
               title=f"{task.name} seed {config.seed}: {result['model']}, {config.optimizer}, d={config.dim}")
    result["zero_shot"] = zero_shot
    result["files"] = {"result": str(result_path), "log": str(run.log_path), "curve": str(run.dir / "curve.png")}
    return result


def _adamix_scores(session: Session, z: np.ndarray, test_acc_merged: float, show: bool) -> dict[str, float]:
    """AdaMix's two ways to use the copies, for the best z: routed (each example to its
    copy, as in the search) and merged (the copies' average, what dev and test use)."""
    test_acc_routed, _ = evaluate_split(session, "test-routed", z, "test (routed)", show)
    routed, merged = (session.evaluate(split, z[None, :]) for split in ("train", "train-merged"))
    scores = {"train_acc_routed": float(routed.accuracy[0]), "train_acc_merged": float(merged.accuracy[0]),
              "test_acc_routed": test_acc_routed, "test_acc_merged": test_acc_merged}
    if show:
        tqdm.write("adamix, routed vs merged copies: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    return scores


def _stop_reason(config: TuneConfig, optimizer, calls_after_next: int, generation: int, best_generation: int,
                 elapsed_s: float) -> str | None:
    """Why the loop must not start another generation, or None. Derived from the run's
    state alone, so a resumed run stops exactly where the uninterrupted one would."""
    if calls_after_next > config.budget:
        return "budget"
    if optimizer.stop():
        return "optimizer"
    if config.patience and generation - best_generation >= config.patience:
        return "patience"
    if config.max_wall_s and elapsed_s >= config.max_wall_s:
        return "wall_clock"
    return None


# Settings a resumed run may change: the budget may grow, the folder may have moved.
RESUMABLE_CHANGES = ("budget", "out", "data_dir", "max_wall_s")


def _check_resumable(checkpoint: dict[str, Any], config: TuneConfig, model: str) -> None:
    # Settings added since the checkpoint was written hold their defaults there.
    stored = {**dataclasses.asdict(TuneConfig()), **checkpoint["config"]}
    now = dataclasses.asdict(config)
    changed = [f"{key}: {stored.get(key)!r} -> {now[key]!r}" for key in now
               if key not in RESUMABLE_CHANGES and stored.get(key) != now[key]]
    if stored.get("budget") != config.budget and "budget" in optimizer_class(config.optimizer).option_defaults:
        changed.append(f"budget: {stored.get('budget')!r} -> {config.budget!r} ({config.optimizer} planned its "
                       "search for the run's budget; resume it with the same one)")
    if checkpoint["model"] != model:
        changed.append(f"model: {checkpoint['model']!r} -> {model!r}")
    if changed:
        raise ValueError(f"cannot resume {config.out} with other settings ({'; '.join(changed)})")
