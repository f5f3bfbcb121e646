"""One black-box tuning run: task -> session -> ask/evaluate/tell loop -> test -> files.

The loop owns the bookkeeping the objective must not do: counting API calls, checking
the generation's best candidate on dev, keeping the best-on-dev z, logging, and the
final test evaluation of that z. `RunState` is where the run stands after a generation,
and exactly what its checkpoint holds; `run_generation` is one step of the loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from blackbox.calibration import LabelBias, log_softmax
from blackbox.client import BackboneClient, BackboneError, Session
from blackbox.objective import Objective
from blackbox.optim import Optimizer, optimizer_class
from blackbox.progress import Progress
from blackbox.report import plot_curve
from blackbox.runlog import RunLog
from blackbox.tasks import (Example, Task, get_task, load_split, pick_demonstrations, place_prompt,
                            stratified_subset, with_demonstrations)
from blackbox.tune_config import TuneConfig, build_optimizer, check_resumable, delta_spec, prompt_init_text

__all__ = ["RunData", "RunState", "evaluate_split", "load_run_data", "run_generation", "run_tune"]

# Test splits are scored in slices so that long evaluations show progress.
EVAL_SLICE = 256


@dataclass
class RunState:
    """Where a run stands after its last finished generation: the checkpoint's contents."""

    config: dict[str, Any]  # the run's TuneConfig, as a dict
    model: str
    optimizer: bytes  # the optimizer's state_dict()
    zero_shot: dict[str, float]  # test_acc, dev_acc, dev_loss of z = 0
    best_z: np.ndarray
    best_dev_acc: float
    best_dev_loss: float
    best_generation: int = 0
    generation: int = 0
    api_calls: int = 0
    elapsed_s: float = 0.0
    # A calibrated run's per-class offsets for best_z (fitted on train); None: not calibrated.
    best_label_bias: np.ndarray | None = None
    # --ensemble K: the K best candidates scored on dev so far, best first, each a dict of
    # z, label_bias, dev_acc and dev_loss.
    leaders: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def checkpoint(self) -> dict[str, Any]:
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any]) -> RunState:
        # Checkpoints written before a field existed lack it and take its default.
        return cls(**{field.name: checkpoint[field.name] for field in dataclasses.fields(cls) if field.name in checkpoint})


@dataclass
class RunData:
    """A run's task and the examples of its splits, read before any server is asked."""

    task: Task
    splits: dict[str, list[Example]]
    demonstrations: list[Example] = dataclasses.field(default_factory=list)


def load_run_data(config: TuneConfig) -> RunData:
    """The task and splits `config` names, or its task file holds; TaskError for a bad name,
    seed, data folder or task file. A task file's paths are its own (not under data_dir),
    and the seed picks a seed folder only in its k-shot folder form."""
    from blackbox.tasks import task_from_file

    if config.task_file:
        task = task_from_file(config.task_file)
        splits = task.read_splits(seed=config.seed, k=config.k)
    else:
        task = get_task(config.task)
        splits = {split: load_split(task, split, seed=config.seed, k=config.k, data_dir=config.data_dir)
                  for split in ("train", "dev", "test")}
    if config.test_limit:
        splits["test"] = stratified_subset(splits["test"], config.test_limit, config.seed)
    demonstrations, splits["train"] = pick_demonstrations(splits["train"], config.demonstrations, config.seed,
                                                          len(task.labels))
    if config.mix == "adamix":
        # The server routes "train" and "*-routed" splits to copies and merges the copies
        # elsewhere: these copies give the best z's routed and merged scores on both sets.
        splits.update({"train-merged": splits["train"], "test-routed": splits["test"]})
    return RunData(task, splits, demonstrations)


def evaluate_split(session: Session, split: str, z: np.ndarray, label: str,
                   progress: Progress | None = None, label_bias: LabelBias | None = None,
                   bias: np.ndarray | None = None) -> tuple[float, float]:
    """Accuracy and mean CE of one candidate on a whole split, in slices; with `progress`,
    as a phase called `label`; with `label_bias`, of its logits shifted by `bias` (C,)."""
    size = session.split_sizes[split]
    correct = loss = 0.0
    with (progress or Progress(silent=True)).phase(label, size, "example", f"{size} {split} examples") as phase:
        for start in range(0, size, EVAL_SLICE):
            scores = session.evaluate(split, z[None, :], start=start, count=EVAL_SLICE,
                                      return_logits=label_bias is not None)
            if label_bias is not None:
                ce, accuracy = label_bias.score(split, scores.logits, bias[None, :], start)
                scores = dataclasses.replace(scores, ce_loss=ce, accuracy=accuracy)
            correct += float(scores.accuracy[0]) * scores.num_examples
            loss += float(scores.ce_loss[0]) * scores.num_examples
            phase.update(scores.num_examples)
    return correct / size, loss / size


def run_generation(state: RunState, optimizer: Optimizer, objective: Objective, session: Session,
                   dev_every: int, ensemble: int = 1) -> dict[str, Any]:
    """One ask, evaluate and tell; every `dev_every` generations the generation's best is
    scored on dev and kept if it beats the best so far (and among the `ensemble` best, if
    more than one). Moves `state` on by the generation (all but its optimizer state and
    time) and returns its log record."""
    tick = time.perf_counter()
    candidates = optimizer.ask()
    block = optimizer.active_block  # read after ask: a turn may have ended there
    if optimizer.uses_gradients:
        losses, gradients, scores = objective.with_gradients(candidates)
        optimizer.tell(candidates, losses, gradients)
    else:
        losses, scores = objective(candidates)
        optimizer.tell(candidates, losses)
    state.generation += 1
    # A gradient call on the train split counts as one call, like one candidate's forward.
    state.api_calls += optimizer.popsize * optimizer.calls_per_candidate
    leader = int(np.argmin(losses))
    record = {
        "generation": state.generation,
        "api_calls": state.api_calls,
        "train_loss": float(losses[leader]),
        "train_loss_mean": float(losses.mean()),
        "train_acc": float(scores.accuracy[leader]),
        "dev_acc": None,
        "dev_loss": None,
        **({"block": session.z_blocks[block][0]} if block is not None else {}),
    }
    if state.generation % dev_every == 0:
        bias = None if objective.label_bias is None else scores.label_bias[leader]
        dev_acc, dev_loss = evaluate_split(session, "dev", candidates[leader], "dev",
                                           label_bias=objective.label_bias, bias=bias)
        record.update(dev_acc=dev_acc, dev_loss=dev_loss)
        if (dev_acc, -dev_loss) > (state.best_dev_acc, -state.best_dev_loss):
            state.best_dev_acc, state.best_dev_loss = dev_acc, dev_loss
            state.best_z, state.best_generation = candidates[leader].astype(np.float32), state.generation
            state.best_label_bias = bias
        if ensemble > 1:
            keep_leader(state, candidates[leader], bias, dev_acc, dev_loss, ensemble)
    record.update(best_dev_acc=state.best_dev_acc, server_ms=scores.server_ms,
                  generation_ms=(time.perf_counter() - tick) * 1e3)
    return record


def keep_leader(state: RunState, z: np.ndarray, bias: np.ndarray | None, dev_acc: float, dev_loss: float,
                size: int) -> None:
    """Adds a candidate scored on dev to the ensemble's members, keeping the `size` best
    by dev accuracy, then dev loss (ties: the earlier one)."""
    state.leaders.append({"z": np.asarray(z, dtype=np.float32), "label_bias": bias, "dev_acc": dev_acc,
                          "dev_loss": dev_loss})
    state.leaders.sort(key=lambda member: (-member["dev_acc"], member["dev_loss"]))
    del state.leaders[size:]


def ensemble_accuracy(session: Session, split: str, members: list[dict[str, Any]], labels: np.ndarray,
                      label_bias: LabelBias | None, progress: Progress) -> float:
    """Accuracy of the members' class probabilities averaged (each with its own offsets)."""
    probabilities = None
    for number, member in enumerate(members, start=1):
        with progress.phase(f"{split} (ensemble member {number} of {len(members)})", len(labels), "example",
                            f"{len(labels)} {split} examples") as phase:
            for start in range(0, len(labels), EVAL_SLICE):
                logits = session.evaluate(split, member["z"][None, :], start=start, count=EVAL_SLICE,
                                          return_logits=True).logits[0].astype(np.float64)
                if label_bias is not None:
                    logits = logits + member["label_bias"][None, :]
                if probabilities is None:
                    probabilities = np.zeros((len(labels), logits.shape[1]))
                probabilities[start:start + len(logits)] += np.exp(log_softmax(logits))
                phase.update(len(logits))
    return float((probabilities.argmax(axis=1) == labels).mean())


def run_tune(config: TuneConfig, client: BackboneClient, show_progress: bool = True,
             overwrite: bool = False, resume: bool = False,
             zero_shot: dict[str, float] | None = None, data: RunData | None = None) -> dict[str, Any]:
    """Runs (or with `resume`, continues) the tuning run that `config` describes.

    `zero_shot` ({"test_acc", "dev_acc", "dev_loss"} of z = 0, as returned in the result
    under that key) skips re-scoring the starting point when a caller already did.
    `data` is the run's `load_run_data(config)`, when the caller has read it already.
    Every phase is said on stderr; `show_progress` adds progress bars.
    """
    started = time.perf_counter()
    progress = Progress(bars=show_progress)
    task, info, template, splits, checkpoint = _prepare(config, client, resume, data)
    if config.calibrated and not info.logits_enabled:  # a keyed server whose operator keeps logits back
        config = dataclasses.replace(config, calibrate=False)
        progress.say("label bias off: the server returns no logits (its operator did not pass --allow-logits)")
    restarting = resume and checkpoint is None  # stopped before its first checkpoint: from the beginning
    init_text = prompt_init_text(config, task.verbalizer)
    spec = delta_spec(config, info.kinds, init_text)
    # The server checks the delta before the run folder is touched.
    session = client.create_session(splits, template, task.verbalizer, spec, truncate=config.truncate)
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
    run.write_config({**dataclasses.asdict(config), "template": template, "init_text": init_text,
                      "verbalizer": list(task.verbalizer),
                      "model": info.model_name,
                      "architecture": info.architecture})
    label_bias = (LabelBias({name: np.array([e.label for e in examples]) for name, examples in splits.items()})
                  if config.calibrated else None)
    try:
        if checkpoint is not None:
            state = RunState.from_checkpoint(checkpoint)
            state.config = dataclasses.asdict(config)  # the settings it goes on with: a new budget
            started -= state.elapsed_s
            progress.say(f"resuming {config.out} after generation {state.generation} ({state.api_calls} API calls)")
        else:
            if restarting:
                progress.say(f"resuming {config.out}: it stopped before its first generation was checkpointed, "
                             "so it starts from the beginning")
            elif run.replaced:
                progress.say(f"starting {config.out} again: the run there stopped before its first generation "
                             f"was checkpointed ({', '.join(run.replaced)})")
            state = _start(config, info.model_name, session, optimizer, zero_shot, progress, label_bias)
        objective = Objective(session, "train", config.loss, label_bias)
        calls_per_generation = optimizer.popsize * optimizer.calls_per_candidate
        generations = (config.budget - state.api_calls) // calls_per_generation
        with progress.phase(f"search ({config.optimizer})", config.budget, "call",
                            f"up to {generations} generations of {calls_per_generation} API calls",
                            done=state.api_calls) as phase:
            while (stop_reason := _stop_reason(config, optimizer, state, calls_per_generation,
                                               time.perf_counter() - started)) is None:
                record = run_generation(state, optimizer, objective, session, config.dev_every, config.ensemble)
                state.optimizer, state.elapsed_s = optimizer.state_dict(), time.perf_counter() - started
                record["elapsed_s"] = state.elapsed_s
                run.log_generation(record)
                run.write_checkpoint(state.checkpoint())
                phase.update(calls_per_generation)
                phase.set_postfix(loss=f"{record['train_loss']:.3f}", dev=f"{state.best_dev_acc:.3f}")
        progress.say(f"search stopped by {stop_reason} after {state.generation} generations: best dev acc "
                     f"{state.best_dev_acc:.4f} (generation {state.best_generation})")

        test_acc, test_loss = evaluate_split(session, "test", state.best_z, "test (best z)", progress,
                                             label_bias, state.best_label_bias)
        ensemble = None
        if config.ensemble > 1:
            labels = np.array([e.label for e in splits["test"]])
            ensemble = {"members": len(state.leaders), "best_z_test_acc": test_acc,
                        "member_dev_acc": [member["dev_acc"] for member in state.leaders],
                        "member_label_bias": [None if m["label_bias"] is None else [float(b) for b in m["label_bias"]]
                                              for m in state.leaders],
                        "z_file": "ensemble_z.npy"}
            test_acc = ensemble_accuracy(session, "test", state.leaders, labels, label_bias, progress)
        adamix = _adamix_scores(session, state.best_z, test_acc, progress) if config.mix == "adamix" else None
    finally:
        # Best effort: a server that went away must not hide the error that ended the run.
        with contextlib.suppress(BackboneError):
            session.close()
        run.close()

    result = _result(config, task, info, spec, session, optimizer, state, test_acc=test_acc, test_loss=test_loss,
                     adamix=adamix, ensemble=ensemble, stop_reason=stop_reason, wall_s=time.perf_counter() - started)
    result_path = run.write_result(result, state.best_z)
    if ensemble is not None:
        np.save(run.dir / "ensemble_z.npy", np.stack([member["z"] for member in state.leaders]))
    plot_curve(run.log_path, run.dir / "curve.png", result)
    result["zero_shot"] = state.zero_shot
    result["files"] = {"result": str(result_path), "log": str(run.log_path), "curve": str(run.dir / "curve.png")}
    return result


def _prepare(config: TuneConfig, client: BackboneClient, resume: bool, data: RunData | None):
    """The task, the server's account of itself, the template, the splits to upload and
    (resuming) the checkpoint: all checked before the run folder is touched, so a refused
    run loses nothing."""
    data = data or load_run_data(config)
    task, splits = data.task, data.splits
    info = client.get_info()
    template = with_demonstrations(place_prompt(task.template_for(info.architecture), config.placement),
                                   data.demonstrations, task.verbalizer)
    if not info.logits_enabled and (config.calibrate or config.ensemble > 1):
        raise ValueError(f"{'--calibrate' if config.calibrate else '--ensemble'} needs the verbalizer logits, and "
                         f"the server hosting {info.model_name} does not return them (its operator's "
                         "--allow-logits); pass --no-calibrate / drop --ensemble")
    if optimizer_class(config.optimizer).uses_gradients and not info.gradients_enabled:
        raise ValueError(f"optimizer {config.optimizer!r} needs gradients, and the server hosting "
                         f"{info.model_name} does not allow them (start it with --allow-gradients)")
    checkpoint = None
    if resume:  # a run stopped before its first checkpoint has none, and starts from the beginning
        stored = RunLog.read_stored(config.out)
        check_resumable(stored.config, stored.model, config, info.model_name,
                        searched=stored.checkpoint is not None)
        checkpoint = stored.checkpoint
    return task, info, template, splits, checkpoint


def _result(config: TuneConfig, task, info, spec, session: Session, optimizer: Optimizer, state: RunState, *,
            test_acc: float, test_loss: float, adamix: dict | None, stop_reason: str, wall_s: float,
            ensemble: dict | None = None) -> dict[str, Any]:
    """result.json: the run's settings, what the server made of them, and its outcome."""
    return {
        "task": task.name,
        "seed": config.seed,
        "model": info.model_name,
        "architecture": info.architecture,
        "device": info.device,
        "dtype": info.dtype,
        "delta": config.delta_kind,
        "prompt_length": spec.prompt_length,
        "rank": config.rank,
        "targets": config.targets,
        "placement": config.placement,
        "prompt_position": session.prompt_position,
        "prefix_reuse": session.prefix_reuse,
        "projection": config.projection,
        "said": config.said,
        "optimizer": config.optimizer,
        "optimizer_options": config.optimizer_options,
        "search_seed": config.search_seed,
        "strategy": config.strategy,
        "loss": config.loss,
        "dim": config.dim,
        "z_dim": session.z_dim,
        "z_blocks": [{"name": name, "size": size} for name, size in session.z_blocks],
        "delta_size": session.delta_size,
        "model_layers": info.num_layers,
        "popsize": optimizer.popsize,
        "sigma": config.sigma,
        "budget": config.budget,
        "api_calls": state.api_calls,
        # Every request's candidates, dev and test included, as the server meters them
        # (its Usage call), in this process: a resumed run counts from where it resumed.
        "metered_calls": session.metered_calls,
        "generations": state.generation,
        "best_generation": state.best_generation,
        "best_dev_acc": state.best_dev_acc,
        "test_acc": test_acc,
        "test_loss": test_loss,
        "zero_shot_test_acc": state.zero_shot["test_acc"],
        "test_examples": session.split_sizes["test"],
        "test_limit": config.test_limit,
        "demonstrations": config.demonstrations,
        "calibrate": config.calibrated,
        "label_bias": None if state.best_label_bias is None else [float(b) for b in state.best_label_bias],
        "test_note": task.test_note,
        "stop_reason": stop_reason,
        "wall_s": wall_s,
        **({"adamix": adamix} if adamix is not None else {}),
        # --ensemble: test_acc is the members' averaged probabilities'; best_z's own is here.
        **({"ensemble": ensemble} if ensemble is not None else {}),
    }


def _start(config: TuneConfig, model: str, session: Session, optimizer: Optimizer,
           zero_shot: dict[str, float] | None, progress: Progress, label_bias: LabelBias | None) -> RunState:
    """A new run's state: z = 0 scored on dev, and on test unless the run says no (or the
    caller gave the scores); the best so far. A calibrated run scores z = 0 with the
    offsets fitted to its train logits (like the dev and test scores of z = 0, outside
    the search's budget)."""
    zero = np.zeros(session.z_dim, dtype=np.float32)
    bias = None
    if label_bias is not None:
        bias = label_bias.fit(session.evaluate("train", zero[None, :], return_logits=True).logits)[0]
    if zero_shot is None:
        test_acc = None
        if config.zero_shot_test:
            test_acc, _ = evaluate_split(session, "test", zero, "zero-shot test", progress, label_bias, bias)
        # Dev is small and the search's first bar: z = 0 is where the best-on-dev starts.
        dev_acc, dev_loss = evaluate_split(session, "dev", zero, "zero-shot dev", label_bias=label_bias, bias=bias)
        zero_shot = {"test_acc": test_acc, "dev_acc": dev_acc, "dev_loss": dev_loss}
    test = "not scored (--no-zero-shot)" if zero_shot["test_acc"] is None else f"{zero_shot['test_acc']:.4f}"
    progress.say(f"zero-shot (z = 0): test acc {test}, dev acc {zero_shot['dev_acc']:.4f}")
    state = RunState(config=dataclasses.asdict(config), model=model, optimizer=optimizer.state_dict(),
                     zero_shot=zero_shot, best_z=zero, best_dev_acc=zero_shot["dev_acc"],
                     best_dev_loss=zero_shot["dev_loss"], best_label_bias=bias)
    if config.ensemble > 1:
        keep_leader(state, zero, bias, zero_shot["dev_acc"], zero_shot["dev_loss"], config.ensemble)
    return state


def _adamix_scores(session: Session, z: np.ndarray, test_acc_merged: float, progress: Progress) -> dict[str, float]:
    """AdaMix's two ways to use the copies, for the best z: routed (each example to its
    copy, as in the search) and merged (the copies' average, what dev and test use)."""
    test_acc_routed, _ = evaluate_split(session, "test-routed", z, "test (routed)", progress)
    routed, merged = (session.evaluate(split, z[None, :]) for split in ("train", "train-merged"))
    scores = {"train_acc_routed": float(routed.accuracy[0]), "train_acc_merged": float(merged.accuracy[0]),
              "test_acc_routed": test_acc_routed, "test_acc_merged": test_acc_merged}
    progress.say("adamix, routed vs merged copies: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    return scores


def _stop_reason(config: TuneConfig, optimizer: Optimizer, state: RunState, calls_per_generation: int,
                 elapsed_s: float) -> str | None:
    """Why the loop must not start another generation, or None. Derived from the run's
    state alone, so a resumed run stops exactly where the uninterrupted one would."""
    if state.api_calls + calls_per_generation > config.budget:
        return "budget"
    if optimizer.stop():
        return "optimizer"
    if config.patience and state.generation - state.best_generation >= config.patience:
        return "patience"
    if config.max_wall_s and elapsed_s >= config.max_wall_s:
        return "wall_clock"
    return None
