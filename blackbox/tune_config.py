"""A tuning run's settings (`TuneConfig`), what they ask the server for (`delta_spec`) and
the optimizer they build; resuming a stored run with the settings it had."""

from __future__ import annotations

import ast
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from blackbox.client import DeltaForm, DeltaSpec, KindInfo
from blackbox.optim import make_optimizer, optimizer_class
from blackbox.optim.blocks import DivideAndConquer
from blackbox.runlog import RunLog
from blackbox.v1.delta_spec import ADAMIX, MIXES
from blackbox.v1.verbalizer import label_words

# "joint": one optimizer searches all of z; "divide-and-conquer": one optimizer per block
# of z (a per-layer deep prompt's layers, a combination's parts), taking turns (BBTv2).
STRATEGIES = ("joint", "divide-and-conquer")
PROMPT_INITS = ("random", "labels")


@dataclass
class TuneConfig:
    """A run's settings. The defaults are BBT's recipe, and what a run stored before a
    setting existed means; `blackbox tune`'s own defaults are the recipe the suite measured
    best (README "Beyond the BBT recipe")."""

    task: str = "sst2"
    # A task of the user's own, read from this JSON task file instead of `task` (which the
    # command line then sets to the file's task name); kept as an absolute path, so that a
    # resumed run finds it from anywhere.
    task_file: str | None = None
    # The k-shot split's seed; also the search's unless `search_seed` is given.
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
    # p0 of kinds with a prompt: "random" (BBT: random word tokens), "labels" (the label
    # words, as prompt tuning initialises from the class labels) or "text=WORDS".
    prompt_init: str = "random"
    projection: str = "normal"
    # Structure-aware subspace (SAID): one more coordinate of z per layer scaling its offset.
    said: bool = False
    optimizer: str = "cma"
    # The optimizer's own settings (`blackbox optimizers` lists them), e.g. {"lr": 0.5}.
    optimizer_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Seeds the projection and the optimizer; None: the split's seed, so that a split's
    # search can be repeated with other draws.
    search_seed: int | None = None
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
    # Train examples of each label written into the template as in-context demonstrations
    # (taken out of the train split the search scores); 0: none.
    demonstrations: int = 0
    # Score every candidate with per-class offsets on its verbalizer logits, fitted to its
    # train logits by the client (blackbox/calibration.py); the best z's go in result.json.
    # None: on wherever it applies (CE loss, a gradient-free optimizer, no AdaMix).
    calibrate: bool | None = False
    # Score test with the class probabilities of the K best candidates on dev averaged
    # (1: the best z alone).
    ensemble: int = 1
    # Score test on a seeded subset of this many examples, each label in its share (0: all).
    test_limit: int = 0
    # Score z = 0 on test before the search (the zero-shot baseline; off saves a test pass).
    zero_shot_test: bool = True
    out: str = "runs/tune"

    def __post_init__(self):
        self.task_file = str(Path(self.task_file).expanduser().resolve()) if self.task_file else None
        if self.search_seed is None:
            self.search_seed = self.seed
        if self.search_seed < 0 or self.seed < 0:
            raise ValueError("seed and search-seed must be >= 0")
        if self.budget < 0:
            raise ValueError(f"budget must be >= 0 (0: score the starting point z = 0 only), got {self.budget}")
        for name in ("popsize", "dim", "prompt_length", "dev_every", "k", "turn_generations", "ensemble"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        generation = optimizer_class(self.optimizer).fixed_popsize or self.popsize
        if 0 < self.budget < generation:
            raise ValueError(f"budget {self.budget} is smaller than one generation (popsize {generation})")
        if not self.sigma > 0 or not self.alpha > 0:
            raise ValueError("sigma and alpha must be > 0")
        if self.patience < 0 or self.max_wall_s < 0 or self.test_limit < 0:
            raise ValueError("patience, max-wall-s and test-limit must be >= 0 (0 turns them off)")
        if self.bound is not None and not self.bound > 0:
            raise ValueError("bound must be > 0")
        if self.prompt_init not in PROMPT_INITS and not self.prompt_init.startswith("text="):
            raise ValueError(f"prompt-init must be one of {', '.join(PROMPT_INITS)} or text=WORDS, "
                             f"got {self.prompt_init!r}")
        if self.prompt_init == "text=":
            raise ValueError("prompt-init text=WORDS needs words after 'text='")
        if self.calibrate and self._why_not_calibrated():
            raise ValueError(f"{self._why_not_calibrated()}; pass --no-calibrate")
        if self.ensemble > 1 and self.mix == ADAMIX:
            raise ValueError("--ensemble does not go with --mix adamix (its routed and merged test splits)")
        if self.mix and self.mix not in MIXES:
            raise ValueError(f"unknown mix {self.mix!r}; choose from {', '.join(MIXES)}")
        if self.mix == ADAMIX and self.adamix_copies < 1:
            raise ValueError(f"adamix-copies must be >= 1, got {self.adamix_copies}")
        form = self.delta_form
        if self.part_dims:
            if len(form.parts) == 1:
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
            if form.mix == ADAMIX:  # one kind's copies, all driven by the whole z
                raise _one_block(form, {})

    @property
    def calibrated(self) -> bool:
        """Whether candidates are scored with a label bias: `calibrate`, or where it is None,
        wherever that applies."""
        if self.calibrate is not None:
            return self.calibrate
        return not self._why_not_calibrated()

    def _why_not_calibrated(self) -> str:
        """Why this run cannot be calibrated ("": it can)."""
        if self.loss != "ce":
            return f"--calibrate fits the label bias to the cross-entropy; it does not go with --loss {self.loss}"
        if optimizer_class(self.optimizer).uses_gradients:
            return f"--calibrate shifts the logits on the client, where {self.optimizer!r} cannot follow its gradients"
        if self.mix == ADAMIX:
            return "--calibrate does not go with --mix adamix (its routed and merged splits)"
        return ""

    @property
    def delta_form(self) -> DeltaForm:
        """The kinds of `delta` ("lora", "prompt+lora") with the run's mix."""
        try:
            form = DeltaForm.parse(self.delta)
            if self.mix:
                if form.mix:
                    raise ValueError(f"--delta {self.delta!r} names a mix already; drop --mix {self.mix}")
                form = dataclasses.replace(form, mix=self.mix, copies=self.adamix_copies if self.mix == ADAMIX else 0)
        except ValueError as error:
            raise ValueError(f"--delta {self.delta!r}: {error}") from None
        return form

    @property
    def delta_kind(self) -> str:
        """The server's name for the delta: "lora", "prompt+lora", "unipelt:lora+adapter", "adamix4:adapter"."""
        return str(self.delta_form)


def _one_block(form: DeltaForm, kinds: Mapping[str, KindInfo]) -> ValueError:
    layered = [name for name, kind in kinds.items() if kind.per_layer_z]
    per_layer = f"a kind with one block per layer ({', '.join(layered)})" if layered else "a per-layer kind"
    return ValueError(f"divide-and-conquer needs z in several blocks: {per_layer} or a combination (KIND+KIND, "
                      f"or --mix unipelt: parts and gates); {str(form)!r} has one")


def prompt_init_text(config: TuneConfig, verbalizer: Sequence[str]) -> str:
    """The text p0 is made of ("": the server's random words), for a task with these label words."""
    if config.prompt_init == "labels":  # every word of every class ("great|good": both)
        return " ".join(word for entry in verbalizer for word in label_words(entry))
    return config.prompt_init.removeprefix("text=") if config.prompt_init != "random" else ""


def delta_spec(config: TuneConfig, kinds: Mapping[str, KindInfo], init_text: str = "") -> DeltaSpec:
    """What the run asks the server to generate from z, given what the server's `kinds`
    take (GetInfo); also what `blackbox export` rebuilds. `init_text` is the run's
    `prompt_init_text`. Kinds the server does not know are left for it to refuse."""
    form = config.delta_form
    has_prompt = any(kinds[part].takes_prompt for part in form.parts if part in kinds)
    per_layer_z = False
    if config.strategy == "divide-and-conquer" and form.single in kinds:
        if not kinds[form.single].per_layer_z:
            raise _one_block(form, kinds)
        per_layer_z = True
    # BBT's scaling: std(A) = alpha * std(embeddings) / (sqrt(d) * sigma0).
    if config.prompt_init.startswith("text=") and not has_prompt:
        raise ValueError(f"--prompt-init {config.prompt_init!r} sets up a prompt, and --delta {config.delta!r} has none")
    return DeltaSpec(kind=str(form), prompt_length=config.prompt_length if has_prompt else 0,
                     init_text=init_text if has_prompt else "",
                     intrinsic_dim=config.dim, projection=config.projection, seed=config.search_seed,
                     projection_scale=config.alpha / config.sigma, rank=config.rank,
                     targets=tuple(t.strip() for t in config.targets.split(",") if t.strip()),
                     per_layer_z=per_layer_z, said=config.said,
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
        planned = {"budget": max(1, config.budget // len(blocks))} if plans_budget else {}
        return DivideAndConquer(
            f"divide-and-conquer:{config.optimizer}", dim, config.popsize, config.search_seed, sigma0=config.sigma,
            bounds=bounds, options={"blocks": [size for _, size in blocks], "inner": config.optimizer,
                                    "turn_generations": config.turn_generations,
                                    "inner_options": {**planned, **config.optimizer_options} or None},
        )
    planned = {"budget": config.budget} if plans_budget else {}
    return make_optimizer(config.optimizer, dim=dim, popsize=config.popsize, seed=config.search_seed,
                          sigma0=config.sigma, bounds=bounds, options={**planned, **config.optimizer_options} or None)


def parse_optimizer_options(pairs: list[str]) -> dict[str, Any]:
    """`--optimizer-option KEY=VALUE` pairs as a dict; VALUE is read as a Python literal
    (0.5, True, (0.9, 0.99), 'adam') where it is one, else kept as text (adam)."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--optimizer-option takes KEY=VALUE, got {pair!r}")
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            value = text.strip()
        options[key.strip()] = value
    return options


# Settings a resumed run may change: its limits (the budget may grow), where its files are.
RESUMABLE_CHANGES = ("budget", "max_wall_s", "patience", "out", "data_dir")


def resume_config(out: str, budget: int | None = None, changes: Mapping[str, Any] | None = None) -> TuneConfig:
    """The configuration of the run stored in `out`, with a new budget if given.

    `changes` are the settings a user gave on resuming (TuneConfig field -> value): any
    that differs from the run's own, other than RESUMABLE_CHANGES, is refused with the
    list of differences, as is a budget below the calls already spent or one that leaves
    a finished run nothing to do.
    """
    run = RunLog.read_stored(out)  # a run stopped before its first checkpoint: config.json's settings
    fields = {field.name for field in dataclasses.fields(TuneConfig)}
    stored = _stored_config({key: value for key, value in run.config.items() if key in fields})
    changes = {**(changes or {}), **({"budget": budget} if budget is not None else {})}
    unknown = sorted(set(changes) - set(stored))
    if unknown:
        raise ValueError(f"unknown settings {unknown}")
    # Compared as TuneConfig holds them (a task file's path made absolute, ...).
    given = dataclasses.asdict(TuneConfig(**{**stored, **changes, "out": out}))
    differing = [f"{key.replace('_', '-')} {stored[key]!r} -> {given[key]!r}" for key in changes
                 if key not in RESUMABLE_CHANGES and stored[key] != given[key]]
    if differing:
        raise ValueError(f"cannot resume {out} with other settings than its own ({'; '.join(differing)}); "
                         "only --budget, --max-wall-s, --patience and --data-dir may change. Start a new run "
                         "in another --out for other settings")
    config = TuneConfig(**{**stored, **{k: given[k] for k in changes if k in RESUMABLE_CHANGES}, "out": out})
    spent = run.api_calls
    if config.budget < spent:
        raise ValueError(f"--budget {config.budget} is below the {spent} API calls {out} has spent already; "
                         f"give at least {spent}")
    if (Path(out) / "result.json").exists() and config == TuneConfig(**{**stored, "out": out}):
        raise ValueError(f"{out} holds a finished run ({spent} of {config.budget} API calls, result.json); "
                         "resume it with a larger --budget (or other --max-wall-s / --patience) to go on")
    return config


def _stored_config(stored: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's settings, with those added since it was written at the values that
    reproduce it."""
    return {**dataclasses.asdict(TuneConfig(seed=stored.get("seed", TuneConfig.seed))), **stored}


def check_resumable(stored_config: dict[str, Any], stored_model: str, config: TuneConfig, model: str,
                    searched: bool = True) -> None:
    """Refuses to resume a run stored with `stored_config` on `stored_model` as `config` on
    `model`; `searched`: False for a run stopped before its first checkpoint, which starts
    again (its budget may change even where the optimizer plans by it)."""
    stored = _stored_config(stored_config)
    now = dataclasses.asdict(config)
    changed = [f"{key}: {stored.get(key)!r} -> {now[key]!r}" for key in now
               if key not in RESUMABLE_CHANGES and stored.get(key) != now[key]]
    plans_budget = "budget" in optimizer_class(config.optimizer).option_defaults
    if searched and plans_budget and stored.get("budget") != config.budget:
        changed.append(f"budget: {stored.get('budget')!r} -> {config.budget!r} ({config.optimizer} planned its "
                       "search for the run's budget; resume it with the same one)")
    if stored_model != model:
        changed.append(f"model: {stored_model!r} -> {model!r}")
    if changed:
        raise ValueError(f"cannot resume {config.out} with other settings ({'; '.join(changed)})")
