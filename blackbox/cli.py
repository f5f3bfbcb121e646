"""`blackbox` command line: tune, compare, suite, intrinsic-dim, serve, info, tasks, export."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import os
import signal
import sys
import threading
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator

from backbone_server.options import add_server_arguments
from blackbox.client import BackboneClient, BackboneError
from blackbox.runlog import RunDirError
from blackbox.tasks import PLACEMENTS, TaskError, list_tasks
from blackbox.v1.auth import ENVIRONMENT_VARIABLE

# Seconds to wait for a --server to answer and serve: long enough for a server that is
# still loading a small model, short enough that a wrong address fails while one watches.
DEFAULT_TIMEOUT_S = 30.0


def _tune_arguments(parser: argparse.ArgumentParser, comparing: bool = False) -> None:
    task = parser.add_argument_group("task")
    task.add_argument("--task", default="sst2", help=f"one of: {', '.join(list_tasks())}")
    task.add_argument("--task-file", metavar="TASK.json",
                      help="a task of your own instead of --task: a JSON file naming its data, labels, verbalizer "
                           "and template (README 'Your own task'; `blackbox tasks --check TASK.json` shows what it "
                           "holds). Its paths are relative to it; --seed and --k pick a seed folder only in its "
                           "k-shot folder form")
    task.add_argument("--seed", type=int, default=13,
                      help="k-shot split seed (the data has 13, 21 and 42); also seeds the search unless --search-seed")
    task.add_argument("--k", type=int, default=16, help="examples per class in the k-shot split")
    task.add_argument("--data-dir", help="data folder (default: $BLACKBOX_DATA_DIR, else ../shared/data)")
    search = parser.add_argument_group("search")
    search.add_argument("--recipe", choices=("blackbox", "bbt"), default="blackbox",
                        help="the defaults of the options not given: blackbox (the ones below, measured best by the "
                             "suite: docs/results.md) or bbt (BBT's recipe: --delta prompt --placement before --dim "
                             "500 --prompt-length 50 --prompt-init random --no-calibrate)")
    search.add_argument("--budget", type=int,
                        help="API calls, one candidate on the train set = one (default 8000; on --resume, the run's "
                             "own; 0 scores the starting point z = 0 alone: with a weight kind, the manual prompt)")
    search.add_argument("--popsize", type=int, default=20,
                        help="candidates per generation, scored in one batched call (each one API call)")
    search.add_argument("--search-seed", type=int,
                        help="seeds the random projection and the optimizer (default: --seed), to measure the "
                             "search's own spread on one k-shot split")
    search.add_argument("--dim", type=int, default=100, help="intrinsic dimension d (BBT: 500)")
    search.add_argument("--delta", default="prefix",
                        help="what z generates: prefix (keys and values at every layer), prompt (BBT's soft prompt), "
                             "deep-prompt (BBTv2: every layer), lora, adapter, bias (BitFit), or several joined by + "
                             "(z is split among them); `blackbox info` lists what a server supports")
    search.add_argument("--mix", choices=("unipelt", "adamix"),
                        help="unipelt: per-layer gates (from extra coordinates of z) on every part of a KIND+KIND "
                             "delta; adamix: copies of one weight kind, routed per example while searching and "
                             "averaged for dev and test")
    search.add_argument("--adamix-copies", type=int, default=4, help="copies for --mix adamix")
    search.add_argument("--part-dims", default="",
                        help="a KIND+KIND delta: each part's share of --dim, comma-separated in kind order, "
                             "summing to --dim minus the unipelt gates (default: equal shares)")
    search.add_argument("--prompt-length", type=int, default=10, help="prompt tokens (prefix, prompt, deep-prompt; BBT: 50)")
    search.add_argument("--lora-rank", "--adapter-size", dest="rank", type=int, default=0,
                        help="rank of lora, bottleneck size of adapter (0: the kind's default, 4 and 8)")
    search.add_argument("--targets", "--lora-targets", default="",
                        help="comma-separated module-name suffixes a weight delta changes "
                             "(default: lora q_proj,v_proj or query,value; bias: every bias, or every norm)")
    search.add_argument("--placement", choices=PLACEMENTS, default="tail",
                        help="prompt before the text (BBT), after it (a causal backbone then reuses the text), "
                             "or tail: ahead of the template's last word before {mask} (e.g. 'Sentiment{prompt}:'), "
                             "where a prefix leaves a causal model one token to run per candidate")
    search.add_argument("--prompt-init", default="labels", metavar="random|labels|text=WORDS",
                        help="the prompt's starting tokens p0 (prefix, prompt, deep-prompt): random word tokens "
                             "(BBT), the task's label words, or the tokens of WORDS; repeated or cut to "
                             "--prompt-length. Kinds without a prompt ignore random and labels")
    search.add_argument("--projection", default="normal",
                        help="normal (BBT scaling), uniform, sparse, fastfood (large deltas), or identity "
                             "(z is the whole delta: --dim = D, its size, which result.json records as delta_size), or "
                             "subspace:NAME, a learned subspace the server hosts (`blackbox subspace fit`)")
    search.add_argument("--said", action="store_true",
                        help="structure-aware subspace (Aghajanyan et al.'s SAID): one more coordinate of z per "
                             "layer (and one for the input prompt) scaling that part's offset by 1 + s; z = 0 is "
                             "the plain subspace's start")
    if comparing:
        search.add_argument("--optimizers", default="cma,sep-cma,ng:TwoPointsDE,mezo",
                            help="comma-separated optimizers, each run with the same task, delta and budget")
    else:
        search.add_argument("--optimizer", default="cma", help="cma, sep-cma, ng:NAME, mezo, or the white-box gradient")
    search.add_argument("--optimizer-option", action="append", default=[], metavar="KEY=VALUE", dest="optimizer_options",
                        help="an optimizer setting, e.g. lr=0.5 (mezo), CMA_active=False (cma); repeat for several; "
                             "`blackbox optimizers` lists each optimizer's")
    search.add_argument("--strategy", choices=("joint", "divide-and-conquer"), default="joint",
                        help="joint: one optimizer over all of z; divide-and-conquer (BBTv2): one optimizer per "
                             "block of z, taking turns (deep-prompt: one block of --dim per layer; a combination: "
                             "one per part, plus the unipelt gates)")
    search.add_argument("--turn-generations", type=int, default=1,
                        help="divide-and-conquer: generations of one block before the next block's turn")
    search.add_argument("--sigma", type=float, default=1.0, help="initial step size")
    search.add_argument("--alpha", type=float, default=1.0, help="BBT's projection scale")
    search.add_argument("--bound", type=float, help="box bound on every coordinate of z")
    search.add_argument("--loss", choices=("ce", "hinge"), default="ce",
                        help="what the search minimises on train: cross-entropy over the verbalizer words, or BBT's "
                             "multi-class hinge")
    search.add_argument("--dev-every", type=int, default=1, help="check the generation's best on dev every N generations")
    search.add_argument("--patience", type=int, default=0,
                        help="stop after N generations without a better dev accuracy (0: off)")
    search.add_argument("--max-wall-s", type=float, default=0.0,
                        help="start no generation after this many seconds of the run (0: no limit)")
    search.add_argument("--demonstrations", type=int, default=0, metavar="N",
                        help="in-context demonstrations: N train examples of each label, filled with their label "
                             "words, ahead of every text (taken out of the train split the search scores)")
    search.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=None,
                        help="score each candidate with per-class offsets on its label-word logits, fitted to its own "
                             "train logits (contextual calibration; no extra API calls; result.json keeps the best "
                             "z's offsets as label_bias). Default: on, except with the gradient optimizer, the hinge "
                             "loss and --mix adamix, which it does not go with")
    search.add_argument("--ensemble", type=int, default=1, metavar="K",
                        help="score test with the class probabilities of the K best candidates on dev averaged "
                             "(1: the best z alone; result.json keeps the best z's own test accuracy under ensemble)")
    search.add_argument("--truncate", action="store_true", help="cut texts that exceed the model's length")
    search.add_argument("--test-limit", type=int, default=0,
                        help="score test on a seeded subset of N examples, each label in its share (0: all; "
                             "result.json records it)")
    search.add_argument("--no-zero-shot", dest="zero_shot_test", action="store_false",
                        help="skip scoring z = 0 on test before the search (result.json then has no zero-shot test "
                             "accuracy)")
    _backbone_arguments(parser, "HOST:PORT of a running backbone, or HOST:PORT,HOST:PORT,... of replicas that "
                                "share each population; without it an embedded one starts")
    output = parser.add_argument_group("output")
    output.add_argument("--out", default="runs/tune", help="run folder for log.jsonl, result.json, curve.png")
    output.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")
    if not comparing:
        output.add_argument("--resume", action="store_true",
                            help="continue the run stored in --out with its own settings and the --budget given now")
    output.add_argument("--quiet", action="store_true", help="no progress bars")
    if not comparing:
        output.add_argument("--save-as", metavar="NAME",
                            help="store the run's best z on the --server under NAME (SaveDelta), for `blackbox "
                                 "predict --delta-name NAME` and `generate`; --overwrite replaces a stored one")


def _backbone_arguments(parser: argparse.ArgumentParser, server_help: str) -> None:
    """--server, or the embedded server's model and device (`_EMBEDDED_ONLY`)."""
    backend = parser.add_argument_group("backbone")
    backend.add_argument("--server", help=server_help)
    backend.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                         help="seconds to wait for --server to answer and serve its model")
    _connection_arguments(backend)
    backend.add_argument("--model", default="smollm2-135m",
                         help="model of the embedded server: smollm2-135m (bundled), tiny-llama, tiny-roberta, "
                              "tiny-gpt2, a local Hugging Face folder or a .gguf file (tune --resume: the run's own)")
    backend.add_argument("--device", default="auto", help="device of the embedded server")
    backend.add_argument("--dtype", default="auto", help="dtype of the embedded server")
    backend.add_argument("--device-map", help="'auto' spreads the embedded server's model over all GPUs "
                                              "(accelerate), for models larger than one; replaces --device")
    backend.add_argument("--max-batch-tokens", type=int, default=0,
                         help="memory bound of the embedded server (0: its device's default)")
    backend.add_argument("--subspace", action="append", default=[], metavar="NAME=FILE",
                         help="a learned subspace (`blackbox subspace fit`) the embedded server hosts, for "
                              "--projection subspace:NAME; repeat for several")


def _connection_arguments(group) -> None:
    """How a client reaches a --server: its key and TLS (every client command takes them)."""
    group.add_argument("--api-key", help=f"the tenant's API key of a server with --api-keys (default: "
                                         f"${ENVIRONMENT_VARIABLE}); prefer the variable: a command line is visible "
                                         "to other users of the machine")
    group.add_argument("--tls", action="store_true",
                       help="connect over TLS, trusting the system's certificate authorities (or write the "
                            "address as grpcs://HOST:PORT)")
    group.add_argument("--tls-ca", metavar="PEM", help="connect over TLS, trusting this certificate authority "
                                                       "(a self-signed server certificate itself)")


def _client_options(args: argparse.Namespace) -> dict[str, Any]:
    """BackboneClient's (and ReplicaPool's) options from the connection arguments."""
    return {"api_key": args.api_key, "tls": args.tls, "tls_ca": args.tls_ca,
            "on_event": lambda message: print(f"  {message}", file=sys.stderr, flush=True)}


def _client(args: argparse.Namespace, address: str | None = None) -> BackboneClient:
    return BackboneClient(address or args.server, **_client_options(args))


def _start_embedded(args: argparse.Namespace, stack: ExitStack, allow_gradients: bool, serving: str = "") -> str:
    """The address of an embedded server with the options' model, which `stack` stops."""
    from blackbox.embedded import embedded_server

    print(f"starting an embedded backbone server with {args.model}{serving} ...", file=sys.stderr, flush=True)
    return stack.enter_context(embedded_server(args.model, args.device, args.dtype, args.max_batch_tokens,
                                               allow_gradients=allow_gradients, device_map=args.device_map,
                                               subspaces=args.subspace))


def _config_values(args: argparse.Namespace, names: set[str] | None = None) -> dict[str, Any]:
    """TuneConfig fields from the parsed options (only `names` among them, if given)."""
    from blackbox.tune_config import TuneConfig, parse_optimizer_options

    fields = {field.name for field in dataclasses.fields(TuneConfig)}
    values = {name: getattr(args, name) for name in vars(args) if name in fields and (names is None or name in names)}
    if "mix" in values:
        values["mix"] = values["mix"] or ""
    if "optimizer_options" in values:
        values["optimizer_options"] = parse_optimizer_options(values["optimizer_options"])
    if values.get("budget", 0) is None:
        values.pop("budget")
    if getattr(args, "recipe", None) == "bbt":
        for name in BBT_RECIPE:
            if name in values and name not in getattr(args, "given", ()):
                values[name] = getattr(TuneConfig, name)
    if getattr(args, "task_file", None) and "task" in getattr(args, "given", ()):
        raise ValueError("--task and --task-file exclude each other: --task names a built-in task, --task-file "
                         "reads your own")
    return values


def _config_from_args(args: argparse.Namespace, optimizer: str):
    from blackbox.tune_config import TuneConfig

    values = _config_values(args)
    if values.get("task_file"):  # the run's task is the file's: config.json names it
        from blackbox.tasks import task_from_file

        values["task"] = task_from_file(values["task_file"]).name
    return TuneConfig(**{**values, "optimizer": optimizer})


# What `--recipe bbt` sets back to TuneConfig's defaults (BBT's recipe) unless given.
BBT_RECIPE = ("delta", "placement", "dim", "prompt_length", "prompt_init", "calibrate")

# Options that set up the embedded server; a --server has its own.
_EMBEDDED_ONLY = ("model", "device", "dtype", "device_map", "max_batch_tokens", "subspace")


def _embedded_options(args: argparse.Namespace) -> list[str]:
    """The embedded server's options typed, as arguments of each run (a Ray task starts its own)."""
    options = []
    for name in _EMBEDDED_ONLY:
        if name in args.given:
            value = getattr(args, name)
            options += [f"--{name.replace('_', '-')}={item}" for item in (value if isinstance(value, list) else [value])]
    return options


def _runs_backbone(args: argparse.Namespace, stack: ExitStack, allow_gradients: bool, serving: str) -> list[str]:
    """The backbone arguments of every run a suite or sweep starts: --server, or on Ray the
    embedded server's options (each Ray task starts its own: a cluster shares no loopback),
    else one embedded server for all the runs, loaded once, which `stack` stops."""
    if args.server is not None:
        if args.api_key:  # to the runs through their environment, not their command lines
            os.environ[ENVIRONMENT_VARIABLE] = args.api_key
        return ["--server", args.server, "--timeout", str(args.timeout), *(["--tls"] if args.tls else []),
                *(["--tls-ca", args.tls_ca] if args.tls_ca else [])]
    if args.ray:
        return _embedded_options(args)
    return ["--server", _start_embedded(args, stack, allow_gradients=allow_gradients, serving=serving)]


def _check_mode(args: argparse.Namespace) -> None:
    """Refuses options that would do nothing in the mode chosen."""
    if args.server is not None:
        ignored = [f"--{name.replace('_', '-')}" for name in _EMBEDDED_ONLY if name in args.given]
        if ignored:
            verb = "sets" if len(ignored) == 1 else "set"
            raise ValueError(f"{', '.join(ignored)} {verb} up the embedded server; the backbone at {args.server} "
                             "hosts its own model on its own device: drop them, or drop --server")
    elif "timeout" in args.given:
        raise ValueError("--timeout bounds the wait for --server; the embedded server loads its model first")
    else:
        for name in ("api_key", "tls", "tls_ca"):
            if name in args.given:
                raise ValueError(f"--{name.replace('_', '-')} is how a client reaches a --server; the embedded "
                                 "server is open, on loopback")


def _connect(args: argparse.Namespace, stack: ExitStack, optimizers: list[str]) -> BackboneClient:
    """A ready client: to --server (a ReplicaPool when it lists several), or to an
    embedded server that `stack` stops."""
    address = args.server
    timeout = args.timeout
    if address is None:
        timeout = DEFAULT_TIMEOUT_S  # it is serving already
        from blackbox.optim import optimizer_class

        # The embedded server is the user's own: it answers gradients when a run needs them.
        address = _start_embedded(args, stack, any(optimizer_class(name).uses_gradients for name in optimizers))
    addresses = [part.strip() for part in address.split(",") if part.strip()]
    if len(addresses) > 1:
        from blackbox.replicas import ReplicaPool

        client = stack.enter_context(ReplicaPool(addresses, **_client_options(args)))
    else:
        client = stack.enter_context(_client(args, addresses[0] if addresses else address))
    if args.server is not None:
        print(f"connecting to the backbone at {args.server} (up to {timeout:g} s, --timeout) ...",
              file=sys.stderr, flush=True)
    client.wait_ready(timeout=timeout, on_wait=lambda heard: print(f"  waiting: {heard}", file=sys.stderr, flush=True)
                      if args.server is not None else None)
    return client


def _check_before_loading(config, optimizers: list[str]):
    """Everything that can be checked without a server, so that a mistake costs no model
    load: the task, its seed and data, the settings, each optimizer and its options."""
    from blackbox.tune_config import build_optimizer
    from blackbox.tuner import load_run_data

    data = load_run_data(config)
    for name in optimizers:
        build_optimizer(dataclasses.replace(config, optimizer=name))
    return data


def _tune(args: argparse.Namespace) -> int:
    from blackbox.tune_config import resume_config
    from blackbox.tuner import run_tune

    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    if args.resume:
        config = resume_config(args.out, changes=_config_values(args, args.given - {"out"}))
        if args.server is None and "model" not in args.given:
            from blackbox.runlog import RunLog

            args.model = RunLog.read_stored(args.out).model  # the run's own
    else:
        config = _config_from_args(args, args.optimizer)
    data = _check_before_loading(config, [config.optimizer])
    if args.save_as and args.server is None:
        raise ValueError("--save-as stores the delta on a --server; an embedded server keeps nothing after the run "
                         "(its run folder is the delta: `blackbox predict --run DIR`)")
    with ExitStack() as stack:
        client = _connect(args, stack, [config.optimizer])
        if args.save_as and not args.overwrite and args.save_as in {d.name for d in client.list_deltas()}:
            raise ValueError(f"the server stores a delta named {args.save_as!r} already; choose another name or "
                             "pass --overwrite")  # before the run, not after it
        result = run_tune(config, client, show_progress=not args.quiet, overwrite=args.overwrite,
                          resume=args.resume, data=data)
        if args.save_as:
            from blackbox.deltas import saved_delta_of_run

            client.save_delta(saved_delta_of_run(args.out, args.save_as, client.get_info().kinds), overwrite=True)
            print(f"saved the best z on {args.server} as {args.save_as!r}: blackbox predict --server {args.server} "
                  f"--delta-name {args.save_as} --input TEXTS.jsonl --out PREDICTIONS.jsonl", file=sys.stderr)
    zero_shot = result["zero_shot_test_acc"]
    print(
        f"{result['task']} seed {result['seed']} on {result['model']}: zero-shot test acc "
        f"{'not scored' if zero_shot is None else f'{zero_shot:.4f}'} -> tuned {result['test_acc']:.4f} "
        f"(best dev {result['best_dev_acc']:.4f}; {result['api_calls']} API calls, "
        f"{result['generations']} generations, {result['wall_s']:.0f} s; stopped by {result['stop_reason']})"
    )
    print(f"results: {result['files']['result']}  log: {result['files']['log']}  plot: {result['files']['curve']}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from blackbox.compare import compare, markdown_table

    optimizers = [name.strip() for name in args.optimizers.split(",") if name.strip()]
    config = _config_from_args(args, optimizers[0] if optimizers else "cma")
    _check_before_loading(config, optimizers)
    with ExitStack() as stack:
        client = _connect(args, stack, optimizers)
        rows = compare(config, optimizers, client, show_progress=not args.quiet, overwrite=args.overwrite)
    print(markdown_table(rows), end="")
    print(f"table: {args.out}/compare.csv  {args.out}/compare.md  plot: {args.out}/compare.png")
    return 0


@contextmanager
def _server_extra(what: str):
    """Imports of the server side, which a client-only install lacks."""
    try:
        yield
    except ImportError as error:
        raise RuntimeError(f"{what} needs the server extra ({error.name} is missing): "
                           "pip install 'blackbox-tuner[server]'") from None


def _serve(args: argparse.Namespace) -> int:
    with _server_extra("serving"):
        from backbone_server.server import serve
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return serve(args)


def _info(args: argparse.Namespace) -> int:
    """The model, its limits, and the caller's own metered use (the Usage call)."""
    with _client(args) as client:
        client.wait_ready(timeout=args.timeout,
                          on_wait=lambda heard: print(f"waiting for {args.server}: {heard}", file=sys.stderr, flush=True))
        info = dataclasses.asdict(client.get_info())
        try:
            info["usage"] = dataclasses.asdict(client.usage())
        except BackboneError as error:
            if error.code.name != "UNIMPLEMENTED":  # a server older than the Usage call
                raise
        print(json.dumps(info, indent=2))
    return 0


def _deltas(args: argparse.Namespace) -> int:
    """deltas list | save | delete on a --server, the tenant's own."""
    with _client(args) as client:
        client.wait_ready(timeout=args.timeout)
        if args.deltas_command == "list":
            listed = [{"name": d.name, "delta": d.delta.kind, "z_dim": d.z_dim, "model": d.model_name,
                       "saved": d.saved_unix, **d.notes} for d in client.list_deltas()]
            print(json.dumps(listed, indent=2))
        elif args.deltas_command == "save":
            from blackbox.deltas import saved_delta_of_run

            saved = saved_delta_of_run(args.run_dir, args.name, client.get_info().kinds)
            z_dim = client.save_delta(saved, overwrite=args.overwrite)
            print(f"stored {args.run_dir}'s best z ({z_dim} coordinates) on {args.server} as {args.name!r}")
        else:
            client.delete_delta(args.name)
            print(f"deleted {args.name!r} on {args.server}")
    return 0


def _used_delta(args: argparse.Namespace):
    """(name, SavedDelta) of predict and generate: a stored delta, or a run folder's best z."""
    if bool(args.delta_name) == bool(args.run_dir):
        raise ValueError("give --delta-name NAME (stored on the --server) or --run DIR (a tune run folder)")
    if args.delta_name and args.server is None:
        raise ValueError("--delta-name names a delta stored on a --server; an embedded server stores none "
                         "(use --run DIR)")
    if args.run_dir and args.server is None and "model" not in args.given:
        try:
            args.model = json.loads((Path(args.run_dir) / "config.json").read_text())["model"]
        except (OSError, ValueError, KeyError):
            raise RunDirError(f"{args.run_dir} holds no tune run (config.json)") from None


def _predict(args: argparse.Namespace) -> int:
    from blackbox.deltas import predict_file, read_texts, saved_delta_of_run
    from blackbox.progress import Progress

    _check_mode(args)
    _used_delta(args)
    texts = read_texts(args.input)
    with ExitStack() as stack:
        client = _connect(args, stack, [])
        delta = saved_delta_of_run(args.run_dir, "run", client.get_info().kinds) if args.run_dir else None
        predicted = predict_file(client, texts, args.out, name=args.delta_name or "", delta=delta,
                                 progress=Progress(bars=not args.quiet))
    print(f"predictions: {args.out} ({predicted} texts now, {len(texts) - predicted} from before)")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from blackbox.deltas import saved_delta_of_run

    _check_mode(args)
    _used_delta(args)
    with ExitStack() as stack:
        client = _connect(args, stack, [])
        delta = saved_delta_of_run(args.run_dir, "run", client.get_info().kinds) if args.run_dir else None
        (generation,) = client.generate([(args.prompt, args.text_b)], name=args.delta_name or "", delta=delta,
                                        max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                        seed=args.seed, stop=args.stop)
    print(generation.text)
    print(f"({len(generation.tokens)} tokens, stopped by {generation.finish_reason})", file=sys.stderr)
    return 0


def _keys_new(args: argparse.Namespace) -> int:
    from blackbox.v1.auth import hash_key, new_key

    key = new_key()
    tenant = {"name": args.tenant, "key_sha256": hash_key(key), "quota_calls": args.quota_calls,
              "max_sessions": args.max_sessions, "max_examples": args.max_examples}
    if any(value < 0 for value in (args.quota_calls, args.max_sessions, args.max_examples)):
        raise ValueError("--quota-calls, --max-sessions and --max-examples are counts >= 0")
    if args.keys_file:
        path = Path(args.keys_file)
        try:
            document = json.loads(path.read_text()) if path.exists() else {"tenants": []}
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"cannot read the keys file {path}: {error}") from None
        tenants = document.get("tenants") if isinstance(document, dict) else None
        if not isinstance(tenants, list):
            raise ValueError(f'{path} must hold {{"tenants": [...]}}')
        if any(isinstance(t, dict) and t.get("name") == args.tenant for t in tenants):
            raise ValueError(f"{path} has a tenant {args.tenant!r} already; choose another name or edit the file")
        tenants.append(tenant)
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(document, indent=2) + "\n")
        os.chmod(partial, 0o600)
        partial.replace(path)
        print(f"added tenant {args.tenant!r} to {path}; restart the server to let it in", file=sys.stderr)
    else:
        print("add this line to the keys file's \"tenants\" list:", file=sys.stderr)
        print(json.dumps(tenant), file=sys.stderr)
    print(f"the key of {args.tenant!r}, shown this once (the server keeps only its SHA-256):", file=sys.stderr)
    print(key)
    return 0


def _optimizers(args: argparse.Namespace) -> int:
    from blackbox.optim import available_optimizers, optimizer_class

    for name in available_optimizers():
        cls = optimizer_class(name.replace("<NAME>", "NGOpt"))
        print(f"{name}: {cls.describe().splitlines()[0]}")
        for option, default in cls.describe_options().items():
            print(f"    {option} = {default}")
    print("set one with --optimizer-option KEY=VALUE (repeat for several)")
    return 0


def _tasks(args: argparse.Namespace) -> int:
    from blackbox.tasks import describe_task_file, get_task

    if args.check is not None:
        for line in describe_task_file(args.check, seed=args.seed, k=args.k, placement=args.placement):
            print(line)
        print(f"{args.check}: a valid task file; tune on it with blackbox tune --task-file {args.check}")
        return 0
    given = sorted(args.given & {"seed", "k", "placement"})
    if given:
        raise ValueError(f"{', '.join('--' + name for name in given)}: only with --check TASK.json")
    for name in list_tasks():
        task = get_task(name)
        print(f"{name:8s} {len(task.labels)} classes: {', '.join(task.verbalizer)}")
    return 0


def _export(args: argparse.Namespace) -> int:
    with _server_extra("export"):
        import backbone_server.export  # noqa: F401  (the server side writes the tensors)
        from blackbox.export import export_run
    manifest = export_run(args.run_dir, args.out, model=args.model, device=args.device, dtype=args.dtype,
                          fold_prefix=args.fold_prefix, overwrite=args.overwrite)
    print(f"exported the {manifest['kind']} delta of {args.run_dir} ({manifest['peft_type']}, |z| = "
          f"{manifest['z_norm']:.4g}) to {args.out}: {', '.join(manifest['files'])}")
    print(f"load: {manifest['how_to_load']}")
    for warning in manifest["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


class _HelpWithDefaults(argparse.HelpFormatter):
    """Help that ends with each option's default, where it has one worth saying."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or action.nargs == 0 or "default" in text or default is argparse.SUPPRESS
                or default is None or default == "" or default == []):
            return text
        return f"{text} (default: %(default)s)"


class _Commands(argparse._SubParsersAction):
    def add_parser(self, name: str, **kwargs) -> argparse.ArgumentParser:
        return super().add_parser(name, formatter_class=_HelpWithDefaults, allow_abbrev=False, **kwargs)


def run_tune_argv(argv: list[str]) -> dict[str, Any]:
    """Runs `blackbox tune` with `argv` in this process: its exit code and its `error:` line."""
    heard = io.StringIO()
    with contextlib.redirect_stderr(_Tee(sys.stderr, heard)):
        code = main(argv)
    errors = [line[len("error: "):] for line in heard.getvalue().splitlines() if line.startswith("error: ")]
    return {"code": code, "error": errors[-1] if errors else ("" if code == 0 else f"exit code {code}")}


class _Tee(io.TextIOBase):
    def __init__(self, *streams):
        self._streams = streams

    def write(self, text: str) -> int:
        for stream in self._streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self._streams:
            stream.flush()


def _suite(args: argparse.Namespace) -> int:
    from blackbox.suite import Method, load_anchors, load_methods, parse_seeds, run_suite, split_list

    methods = [Method.parse(text) for text in args.method]
    if args.methods:
        methods += load_methods(args.methods)
    if not methods:
        raise ValueError("give at least one --method NAME=\"TUNE OPTIONS\" (or --methods FILE)")
    anchors = load_anchors(args.anchors or None) if args.anchors is not None else None
    common = ["--data-dir", args.data_dir] if args.data_dir else []
    with ExitStack() as stack:
        # A method may use gradients: the suite's embedded server allows them.
        backbone = [] if args.table_only else _runs_backbone(args, stack, allow_gradients=True, serving=" for the suite")
        rows, files = run_suite(split_list(args.tasks), parse_seeds(args.seeds), methods, args.out, run_tune_argv,
                                backbone=[*backbone, *common], workers=args.workers, ray_address=args.ray,
                                anchors=anchors, say=lambda line: print(line, file=sys.stderr, flush=True),
                                table_only=args.table_only)
    print(files["table_md"].read_text(), end="")
    print(f"results: {files['results']}  table: {files['table_md']} {files['table_csv']}  plot: {files['table_png']}")
    unfinished = [row for row in rows if row["status"] != "finished"]
    if unfinished and args.table_only:
        print(f"{len(unfinished)} of {len(rows)} runs have no result yet: the table counts the seeds that have "
              "one in each cell", file=sys.stderr)
    elif unfinished:
        print(f"error: {len(unfinished)} of {len(rows)} runs did not finish (see {files['results']}); run the same "
              "command again to retry them", file=sys.stderr)
        return 2
    return 0


def _suite_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", required=True,
                        help="comma-separated built-in task names and task files (TASK.json)")
    parser.add_argument("--seeds", default="13,21,42", help="comma-separated k-shot split seeds")
    parser.add_argument("--method", action="append", default=[], metavar='NAME="TUNE OPTIONS"',
                        help="a named set of `blackbox tune` options, e.g. bbt=\"--recipe bbt --budget 8000\"; "
                             "repeat for several")
    parser.add_argument("--methods", metavar="FILE", help="methods from a JSON or TOML file: NAME = \"OPTIONS\"")
    parser.add_argument("--workers", type=int, default=1, help="runs at a time in local worker processes")
    parser.add_argument("--ray", metavar="ADDRESS",
                        help="run each run as a Ray task: a cluster's address, 'auto', or 'local' (a private "
                             "local instance)")
    parser.add_argument("--anchors", nargs="?", const="", metavar="FILE",
                        help="print the published rows of the literature beside ours (default file: "
                             "blackbox/data/anchors.json)")
    parser.add_argument("--data-dir", help="data folder of the built-in tasks, for every run")
    parser.add_argument("--table-only", action="store_true",
                        help="run nothing: write results.csv and the table from the run folders already in --out "
                             "(runs not there count as not run)")
    _backbone_arguments(parser, "HOST:PORT of a running backbone every run uses; without it one embedded server "
                                "serves the suite (with --ray, one per run)")
    parser.add_argument("--out", default="runs/suite", help="folder of the suite: run folders, results and table")


def _intrinsic_dim(args: argparse.Namespace) -> int:
    from blackbox.intrinsic import Reference, SweepPlan, budgets_for, check_options, run_sweep
    from blackbox.intrinsic_curve import parse_dims
    from blackbox.suite import Method, parse_seeds

    if bool(args.task) == bool(args.task_file):
        raise ValueError("give the task to sweep: --task NAME or --task-file TASK.json")
    options = list(args.tune_options)
    check_options(options)
    Method.of("sweep", options)  # refuses what the suite sets for every run (--seed, --out, ...)
    if args.budget_per_dim and any(option.split("=")[0] == "--budget" for option in options):
        raise ValueError("--budget and --budget-per-dim exclude each other: one budget for every d, or one per d")
    dims, seeds = parse_dims(args.dims), parse_seeds(args.seeds)
    task = ["--task-file", args.task_file] if args.task_file else ["--task", args.task]
    # Every run's options, checked once here with tune's own parser, before any model loads.
    tune_argv = ["tune", *task, *options, "--dim", str(dims[0])]
    tune_parser = build_parser()
    tune_args = tune_parser.parse_args(tune_argv)
    tune_args.given = _given_options(tune_parser, tune_argv, tune_args)
    config = _config_from_args(tune_args, tune_args.optimizer)
    _check_before_loading(config, [config.optimizer])
    reference = Reference.parse(args.reference)
    sweep = SweepPlan(task=args.task_file or args.task, dims=tuple(dims), seeds=tuple(seeds), options=tuple(options),
                      budgets=budgets_for(dims, config.budget, args.budget_per_dim, config.popsize),
                      reference=reference, reference_budget=args.reference_budget)
    common = ["--data-dir", args.data_dir] if args.data_dir else []
    say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    say(f"sweep: d = {', '.join(map(str, dims))} x seeds {', '.join(map(str, seeds))}; API calls per run: "
        + ", ".join(f"d={d}: {b}" for d, b in sweep.budgets.items()))
    with ExitStack() as stack:
        backbone = _runs_backbone(args, stack, allow_gradients=reference.source == "gradient", serving=" for the sweep")
        summary = run_sweep(sweep, args.out, run_tune_argv, backbone=[*backbone, *common], workers=args.workers,
                            ray_address=args.ray, say=say)
    d90 = summary["d90"]
    low, high = summary["interval"]
    print(f"{summary['task']}: d90 = {'not reached' if d90 is None else f'{d90:.1f}'} "
          f"({100 * summary['interval_level']:.0f}% interval over seeds: {_bound(low)} .. {_bound(high)}) "
          f"at 90% of the reference {summary['reference']:.4f}, {summary['reference_source']}")
    if "note" in summary:
        print(summary["note"])
    files = summary["files"]
    print(f"sweep: {files['sweep']}  d90: {files['d90']}  plot: {files['plot']}")
    planned, finished = summary["runs"]["planned"], summary["runs"]["finished"]
    if finished < planned:
        print(f"error: {planned - finished} of {planned} runs did not finish (see {files['sweep']}); run the same "
              "command again to retry them", file=sys.stderr)
        return 2
    return 0


def _subspace_fit(args: argparse.Namespace) -> int:
    with _server_extra("subspace fit"):
        import backbone_server.deltas  # noqa: F401  (the deltas are rebuilt on the runs' model here)
        from blackbox.subspace_fit import find_runs, fit_subspace
    from blackbox.suite import split_list

    runs = find_runs(args.runs, exclude_tasks=split_list(args.exclude_task))
    print(f"fitting on {len(runs)} runs ...", file=sys.stderr, flush=True)
    meta = fit_subspace(runs, args.out, dim=args.dim, model=args.model, device=args.device)
    print(f"subspace of {meta['dim']} directions of a {meta['kind']} delta (D = {meta['delta_size']}) from "
          f"{len(meta['runs'])} runs of {', '.join(meta['tasks'])}: {100 * meta['explained_total']:.1f}% of their "
          f"squared norm; {meta['file']} ({meta['bytes'] / 2 ** 20:.2f} MiB)")
    print(f"host it: blackbox serve --subspace NAME={meta['file']} (or tune --subspace NAME={meta['file']}), then "
          f"tune --projection subspace:NAME --dim d (d <= {meta['dim']}) --delta {meta['kind']} --prompt-length "
          f"{meta['prompt_length']}")
    return 0


def _subspace_upload(args: argparse.Namespace) -> int:
    name, sep, path = args.subspace.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"give NAME=FILE, got {args.subspace!r}")
    try:
        data = open(path, "rb").read()
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror}") from None
    with _client(args) as client:
        client.wait_ready(timeout=args.timeout)
        hosted = client.upload_subspace(name, data)
    print(f"{args.server} hosts {path} as {hosted.projection}: {hosted.dim} directions of a delta of D = "
          f"{hosted.delta_size}; tune with --projection {hosted.projection} --dim d (d <= {hosted.dim})")
    return 0


def _bound(value) -> str:
    return "not reached" if value is None else f"{value:.1f}"


def _intrinsic_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", help=f"a built-in task: {', '.join(list_tasks())}")
    parser.add_argument("--task-file", metavar="TASK.json", help="a task of your own (README 'Your own task')")
    parser.add_argument("--dims", required=True,
                        help="the intrinsic dimensions d: a list (4,8,16), a geometric range START:STOP:xFACTOR "
                             "(8:1024:x2), or both (4,8:64:x2)")
    parser.add_argument("--seeds", default="13,21,42", help="comma-separated k-shot split seeds")
    parser.add_argument("--reference", default="best",
                        help="the 100%% level d90 is 90%% of: gradient (the white-box gradient mode on the whole "
                             "delta through the identity projection, one run per seed; the server must allow "
                             "gradients), an accuracy such as 0.8, or best (the sweep's own best mean, said so "
                             "in d90.json)")
    parser.add_argument("--reference-budget", type=int, default=200, help="--reference gradient: steps per seed")
    parser.add_argument("--budget-per-dim", type=int, default=0, metavar="N",
                        help="give each d N x d API calls (at least one generation) instead of one --budget for "
                             "every d; sweep.csv and d90.json say which budget each d got")
    parser.add_argument("--workers", type=int, default=1, help="runs at a time in local worker processes")
    parser.add_argument("--ray", metavar="ADDRESS",
                        help="run each run as a Ray task: a cluster's address, 'auto', or 'local'")
    parser.add_argument("--data-dir", help="data folder of the built-in tasks, for every run")
    _backbone_arguments(parser, "HOST:PORT of a running backbone every run uses; without it one embedded server "
                                "serves the sweep (with --ray, one per run)")
    parser.add_argument("--out", default="runs/intrinsic", help="folder of the sweep: run folders, sweep.csv, "
                                                                 "d90.json, accuracy_vs_d.png")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blackbox", description="Gradient-free black-box tuning of language models")
    parser.register("action", "parsers", _Commands)
    commands = parser.add_subparsers(dest="command", required=True)
    tune = commands.add_parser("tune", help="tune a delta on a task through a backbone server")
    _tune_arguments(tune)
    tune.set_defaults(run=_tune)
    compare = commands.add_parser("compare", help="run several optimizers on the same task, delta and budget")
    _tune_arguments(compare, comparing=True)
    compare.set_defaults(run=_compare, out="runs/compare")
    serve = commands.add_parser("serve", help="host a frozen backbone over gRPC")
    add_server_arguments(serve)
    serve.set_defaults(run=_serve)
    info = commands.add_parser("info", help="describe the model a running server hosts")
    info.add_argument("--server", required=True, help="HOST:PORT")
    info.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                      help="seconds to wait for the server to answer and serve its model")
    _connection_arguments(info)
    info.set_defaults(run=_info)
    deltas = commands.add_parser("deltas", help="tuned deltas stored on a server (SaveDelta): list, save, delete")
    deltas_commands = deltas.add_subparsers(dest="deltas_command", required=True)
    for name, what in (("list", "the tenant's stored deltas"), ("save", "store a tune run's best z"),
                       ("delete", "delete a stored delta")):
        command = deltas_commands.add_parser(name, help=what)
        command.add_argument("--server", required=True, help="HOST:PORT")
        command.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds to wait for the server")
        _connection_arguments(command)
        if name == "save":
            command.add_argument("--run", dest="run_dir", required=True, metavar="DIR", help="a tune run folder")
            command.add_argument("--overwrite", action="store_true", help="replace a stored delta of that name")
        if name in ("save", "delete"):
            command.add_argument("--name", required=True, help="the delta's name on the server")
        command.set_defaults(run=_deltas)
    for name, what in (("predict", "labels and class probabilities of texts under a tuned delta"),
                       ("generate", "text continued under a tuned delta (causal models)")):
        command = commands.add_parser(name, help=what)
        used = command.add_argument_group("the delta")
        used.add_argument("--delta-name", help="a delta stored on the --server (tune --save-as, deltas save)")
        used.add_argument("--run", dest="run_dir", metavar="DIR", help="a tune run folder's best z")
        _backbone_arguments(command, "HOST:PORT of a backbone server; without it an embedded one starts with the "
                                     "run's model")
        if name == "predict":
            command.add_argument("--input", required=True, help='JSONL: {"text_a": ..., "text_b": ...} per line')
            command.add_argument("--out", required=True, help="JSONL: each line with label, label_word and "
                                                              "probabilities; a partial one is continued")
            command.add_argument("--quiet", action="store_true", help="no progress bar")
            command.set_defaults(run=_predict)
        else:
            command.add_argument("--prompt", required=True, help="the text (text_a) that fills the template")
            command.add_argument("--text-b", help="the second text of a pair task's template")
            command.add_argument("--max-new-tokens", type=int, default=32)
            command.add_argument("--temperature", type=float, default=0.0, help="0: greedy; above 0: sampling")
            command.add_argument("--seed", type=int, default=0, help="the sampling seed")
            command.add_argument("--stop", action="append", default=[], help="stop at this string (repeatable)")
            command.set_defaults(run=_generate)
    keys = commands.add_parser("keys", help="API keys of a server's tenants (serve --api-keys)")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)
    new_key = keys_commands.add_parser("new", help="print a fresh key once, and the line of the keys file that "
                                                   "lets it in (the file holds only the key's SHA-256)")
    new_key.add_argument("--tenant", required=True, help="the tenant's name (letters, digits, '_', '-', '.')")
    new_key.add_argument("--quota-calls", type=int, default=100_000, help="API calls it may spend (0: no quota)")
    new_key.add_argument("--max-sessions", type=int, default=4, help="sessions it may hold at once")
    new_key.add_argument("--max-examples", type=int, default=20_000, help="examples in one of its sessions")
    new_key.add_argument("--keys-file", metavar="FILE",
                         help="add the tenant to this keys file (created if missing) instead of only printing it")
    new_key.set_defaults(run=_keys_new)
    optimizers = commands.add_parser("optimizers", help="list the optimizers and the options each takes")
    optimizers.set_defaults(run=_optimizers)
    suite = commands.add_parser("suite", help="run tasks x seeds x methods and print the table of results")
    _suite_arguments(suite)
    suite.set_defaults(run=_suite)
    intrinsic = commands.add_parser(
        "intrinsic-dim", help="accuracy against the intrinsic dimension d over seeds, and d90 with its interval",
        epilog="Every other option is a `blackbox tune` option shared by all runs (--delta, --projection, "
               "--optimizer, --budget, --popsize, --prompt-length, --test-limit, ...); the sweep sets --dim.")
    _intrinsic_arguments(intrinsic)
    intrinsic.set_defaults(run=_intrinsic_dim, takes_tune_options=True)
    subspace = commands.add_parser("subspace", help="learned task subspaces: fit one from tuned runs")
    subspace_commands = subspace.add_subparsers(dest="subspace_command", required=True)
    fit = subspace_commands.add_parser("fit", help="the principal directions of the tuned deltas of runs, as a "
                                                   "subspace file a server hosts (--subspace NAME=FILE)")
    fit.add_argument("--runs", nargs="+", required=True, metavar="DIR",
                     help="run folders, or folders holding them (a suite's or a sweep's --out)")
    fit.add_argument("--exclude-task", default="", metavar="TASKS",
                     help="comma-separated tasks whose runs are left out (the tasks to measure on)")
    fit.add_argument("--dim", type=int, default=0, help="directions to keep (0: all the runs span)")
    fit.add_argument("--out", required=True, help="the subspace file to write (.npz)")
    fit.add_argument("--model", help="the model the runs were tuned on (default: theirs)")
    fit.add_argument("--device", default="cpu", help="device to rebuild the deltas on")
    fit.set_defaults(run=_subspace_fit)
    upload = subspace_commands.add_parser("upload", help="send a subspace file to a server that accepts uploads "
                                                         "(blackbox serve --allow-subspace-uploads)")
    upload.add_argument("subspace", metavar="NAME=FILE", help="the name to host it under and the file")
    upload.add_argument("--server", required=True, help="HOST:PORT")
    upload.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds to wait for the server")
    _connection_arguments(upload)
    upload.set_defaults(run=_subspace_upload)
    tasks = commands.add_parser("tasks", help="list the built-in tasks, or check a task file of your own")
    tasks.add_argument("--check", metavar="TASK.json",
                       help="read a task file and its data and say what they hold: sizes per split and label, the "
                            "templates filled in with the first train example (exit 2 and one error line if wrong)")
    tasks.add_argument("--seed", type=int, default=13, help="--check: the seed folder of a k-shot folder task")
    tasks.add_argument("--k", type=int, default=16, help="--check: k of a k-shot folder task's seed folders")
    tasks.add_argument("--placement", choices=PLACEMENTS, default="tail",
                       help="--check: where the templates show the prompt, as `blackbox tune --placement`")
    tasks.set_defaults(run=_tasks)
    export = commands.add_parser("export", help="write a run's tuned delta (best_z.npy) as adapter weights (PEFT layout)")
    export.add_argument("--run", dest="run_dir", required=True, metavar="DIR", help="the run folder of `blackbox tune`")
    export.add_argument("--out", required=True, help="folder for the adapter (must be empty or new)")
    export.add_argument("--model", help="the model to build the delta on (default: the run's)")
    export.add_argument("--device", default="cpu", help="device to materialise on")
    export.add_argument("--dtype", help="dtype to load the model in (default: the run's)")
    export.add_argument("--fold-prefix", action=argparse.BooleanOptionalAction, default=None,
                        help="put the template's constant tokens ahead of the prompt (e.g. BOS) into the exported "
                             "virtual tokens, so that PEFT's prompt, which comes before the whole input, reproduces "
                             "the run exactly: a soft prompt with their embeddings, a deep prompt (causal model) as "
                             "PEFT prefix tuning. Default: wherever that applies (not to a prompt after the text); "
                             "--fold-prefix: fail where it does not; --no-fold-prefix: the prompt vectors alone, as "
                             "tuned (a deep prompt: blackbox's own format)")
    export.add_argument("--overwrite", action="store_true", help="replace the files of an earlier export in --out")
    export.set_defaults(run=_export)
    return parser


def _given_options(parser: argparse.ArgumentParser, argv: list[str], args: argparse.Namespace) -> set[str]:
    """The options the user typed (by dest), whatever their values: argparse only fills a
    default where the namespace has no value yet, so a namespace of markers keeps the
    marker exactly where nothing was typed. (A list, so that `append` options can copy it.)"""
    unset = type("Unset", (list,), {})()
    command = parser._subparsers._group_actions[0].choices[args.command]
    probe = argparse.Namespace(**{name: unset for name in vars(args)})
    command.parse_known_args(argv[argv.index(args.command) + 1:], namespace=probe)
    return {name for name, value in vars(probe).items() if value is not unset}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "takes_tune_options", False):
        parser.parse_args(argv)  # argparse's own error for options no command takes
    args.tune_options = unknown  # intrinsic-dim hands them to every run's `blackbox tune`
    args.given = _given_options(parser, argv, args)
    with _terminate_as_interrupt(args.command) as nested:
        return _run(args, nested)


RUN_COMMANDS = ("tune", "compare", "suite", "intrinsic-dim")


@contextmanager
def _terminate_as_interrupt(command: str) -> Iterator[bool]:
    """SIGTERM (a service manager's stop, `kill`) ends a run as Ctrl-C does: its server
    session closed, its checkpoint kept; exit code 143 (Ctrl-C: 130). Yields whether this
    main runs inside another's (a suite's or a sweep's runs), which then handles the
    interrupt and stops."""
    if command not in RUN_COMMANDS or threading.current_thread() is not threading.main_thread():
        yield False
        return
    previous = signal.getsignal(signal.SIGTERM)

    def terminate(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
        raise KeyboardInterrupt("SIGTERM")

    terminate.ends_blackbox_runs = True
    if previous is not None:  # None: a handler not set from Python, left alone
        signal.signal(signal.SIGTERM, terminate)
    try:
        yield getattr(previous, "ends_blackbox_runs", False)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace, nested: bool) -> int:
    """The command, with every error it can meet as one line and an exit code."""
    try:
        if args.command in RUN_COMMANDS:
            _check_mode(args)
        code = args.run(args)
        sys.stdout.flush()  # a reader gone away shows here, where it is handled
        return code
    except BackboneError as error:
        hint = ""
        if "truncate=true" in error.details:
            hint = "; pass --truncate to cut such texts to the model's length"
        print(f"error: {error}{hint}", file=sys.stderr)
        return 2
    except (TaskError, RunDirError, ValueError, RuntimeError, TimeoutError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # A reader that stopped early (`blackbox info ... | head`) is not an error; keep the
        # interpreter from reporting the closed pipe again at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt as interrupt:
        if nested:
            raise
        terminated = interrupt.args == ("SIGTERM",)
        print("terminated" if terminated else "interrupted", file=sys.stderr)
        return 143 if terminated else 130
