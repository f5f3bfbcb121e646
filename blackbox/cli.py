"""`blackbox` command line: tune, compare, serve, info, tasks, export."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from contextlib import ExitStack, contextmanager

from backbone_server.options import add_server_arguments
from blackbox.client import BackboneClient, BackboneError
from blackbox.runlog import RunDirError
from blackbox.tasks import PLACEMENTS, TaskError, list_tasks


def _tune_arguments(parser: argparse.ArgumentParser, comparing: bool = False) -> None:
    task = parser.add_argument_group("task")
    task.add_argument("--task", default="sst2", help=f"one of: {', '.join(list_tasks())}")
    task.add_argument("--seed", type=int, default=13, help="k-shot split seed (13, 21, 42); also seeds the search")
    task.add_argument("--k", type=int, default=16, help="examples per class in the k-shot split")
    task.add_argument("--data-dir", help="data folder (default: $BLACKBOX_DATA_DIR, else ../shared/data)")
    search = parser.add_argument_group("search")
    search.add_argument("--budget", type=int,
                        help="API calls, one candidate on the train set = one (default 8000; on --resume, the run's own)")
    search.add_argument("--popsize", type=int, default=20)
    search.add_argument("--dim", type=int, default=500, help="intrinsic dimension d")
    search.add_argument("--delta", default="prompt",
                        help="what z generates: prompt (soft prompt), deep-prompt (BBTv2: every layer), lora, "
                             "adapter, bias (BitFit), or several joined by + (z is split among them); "
                             "`blackbox info` lists what a server supports")
    search.add_argument("--mix", choices=("unipelt", "adamix"),
                        help="unipelt: per-layer gates (from extra coordinates of z) on every part of a KIND+KIND "
                             "delta; adamix: copies of one weight kind, routed per example while searching and "
                             "averaged for dev and test")
    search.add_argument("--adamix-copies", type=int, default=4, help="copies for --mix adamix")
    search.add_argument("--part-dims", default="",
                        help="a KIND+KIND delta: each part's share of --dim, comma-separated in kind order, "
                             "summing to --dim minus the unipelt gates (default: equal shares)")
    search.add_argument("--prompt-length", type=int, default=50, help="prompt tokens (prompt, deep-prompt)")
    search.add_argument("--lora-rank", "--adapter-size", dest="rank", type=int, default=0,
                        help="rank of lora, bottleneck size of adapter (0: the kind's default, 4 and 8)")
    search.add_argument("--targets", "--lora-targets", default="",
                        help="comma-separated module-name suffixes a weight delta changes "
                             "(default: lora q_proj,v_proj or query,value; bias: every bias, or every norm)")
    search.add_argument("--placement", choices=PLACEMENTS, default="before",
                        help="prompt before the text (BBT), after it (a causal backbone then reuses the text), "
                             "or tail: ahead of the template's last word before {mask} (e.g. 'Sentiment{prompt}:'), "
                             "where a prefix leaves a causal model one token to run per candidate")
    search.add_argument("--projection", default="normal",
                        help="normal (BBT scaling), uniform, sparse, fastfood (large deltas), or identity "
                             "(z is the whole delta: --dim = prompt length x hidden size)")
    if comparing:
        search.add_argument("--optimizers", default="cma,sep-cma,ng:TwoPointsDE,mezo",
                            help="comma-separated optimizers, each run with the same task, delta and budget")
    else:
        search.add_argument("--optimizer", default="cma", help="cma, sep-cma, ng:NAME, mezo, or the white-box gradient")
    search.add_argument("--strategy", choices=("joint", "divide-and-conquer"), default="joint",
                        help="joint: one optimizer over all of z; divide-and-conquer (BBTv2): one optimizer per "
                             "block of z, taking turns (deep-prompt: one block of --dim per layer; a combination: "
                             "one per part, plus the unipelt gates)")
    search.add_argument("--turn-generations", type=int, default=1,
                        help="divide-and-conquer: generations of one block before the next block's turn")
    search.add_argument("--sigma", type=float, default=1.0, help="initial step size")
    search.add_argument("--alpha", type=float, default=1.0, help="BBT's projection scale")
    search.add_argument("--bound", type=float, help="box bound on every coordinate of z")
    search.add_argument("--loss", choices=("ce", "hinge"), default="ce")
    search.add_argument("--dev-every", type=int, default=1, help="check the generation's best on dev every N generations")
    search.add_argument("--patience", type=int, default=0,
                        help="stop after N generations without a better dev accuracy (0: off)")
    search.add_argument("--max-wall-s", type=float, default=0.0,
                        help="start no generation after this many seconds of the run (0: no limit)")
    search.add_argument("--truncate", action="store_true", help="cut texts that exceed the model's length")
    search.add_argument("--test-limit", type=int, default=0,
                        help="score test on a seeded subset of N examples, each label in its share (0: all; "
                             "result.json records it)")
    backend = parser.add_argument_group("backbone")
    backend.add_argument("--server", help="HOST:PORT of a running backbone, or HOST:PORT,HOST:PORT,... of replicas "
                         "that share each population; without it an embedded one starts")
    backend.add_argument("--model", default="smollm2-135m", help="model of the embedded server")
    backend.add_argument("--device", default="auto", help="device of the embedded server")
    backend.add_argument("--dtype", default="auto", help="dtype of the embedded server")
    backend.add_argument("--device-map", help="'auto' spreads the embedded server's model over all GPUs "
                                              "(accelerate), for models larger than one; replaces --device")
    backend.add_argument("--max-batch-tokens", type=int, default=0,
                         help="memory bound of the embedded server (0: its device's default)")
    output = parser.add_argument_group("output")
    output.add_argument("--out", default="runs/tune", help="run folder for log.jsonl, result.json, curve.png")
    output.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")
    if not comparing:
        output.add_argument("--resume", action="store_true",
                            help="continue the run stored in --out with its own settings and the --budget given now")
    output.add_argument("--quiet", action="store_true", help="no progress bars")


def _config_from_args(args: argparse.Namespace, optimizer: str):
    from blackbox.tune_config import TuneConfig

    return TuneConfig(
        task=args.task, seed=args.seed, k=args.k, data_dir=args.data_dir,
        budget=args.budget if args.budget is not None else TuneConfig.budget,
        popsize=args.popsize, dim=args.dim, prompt_length=args.prompt_length, delta=args.delta,
        rank=args.rank, targets=args.targets, mix=args.mix or "", adamix_copies=args.adamix_copies,
        part_dims=args.part_dims, placement=args.placement,
        projection=args.projection, optimizer=optimizer, strategy=args.strategy,
        turn_generations=args.turn_generations, sigma=args.sigma, alpha=args.alpha,
        bound=args.bound, loss=args.loss, dev_every=args.dev_every, patience=args.patience,
        max_wall_s=args.max_wall_s, truncate=args.truncate, test_limit=args.test_limit, out=args.out,
    )


def _connect(args: argparse.Namespace, stack: ExitStack, optimizers: list[str]) -> BackboneClient:
    """A ready client: to --server (a ReplicaPool when it lists several), or to an
    embedded server that `stack` stops."""
    address = args.server
    if address is None:
        from blackbox.embedded import embedded_server
        from blackbox.optim import optimizer_class

        print(f"starting an embedded backbone server with {args.model} ...", file=sys.stderr, flush=True)
        # The embedded server is the user's own: it answers gradients when a run needs them.
        allow_gradients = any(optimizer_class(name).uses_gradients for name in optimizers)
        address = stack.enter_context(embedded_server(args.model, args.device, args.dtype, args.max_batch_tokens,
                                                      allow_gradients=allow_gradients, device_map=args.device_map))
    addresses = [part.strip() for part in address.split(",") if part.strip()]
    if len(addresses) > 1:
        from blackbox.replicas import ReplicaPool

        client = stack.enter_context(ReplicaPool(addresses))
    else:
        client = stack.enter_context(BackboneClient(addresses[0] if addresses else address))
    client.wait_ready()
    return client


def _tune(args: argparse.Namespace) -> int:
    from blackbox.tune_config import resume_config
    from blackbox.tuner import run_tune

    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    config = resume_config(args.out, args.budget) if args.resume else _config_from_args(args, args.optimizer)
    if args.resume and args.data_dir:
        config = dataclasses.replace(config, data_dir=args.data_dir)
    with ExitStack() as stack:
        client = _connect(args, stack, [config.optimizer])
        result = run_tune(config, client, show_progress=not args.quiet, overwrite=args.overwrite,
                          resume=args.resume)
    print(
        f"{result['task']} seed {result['seed']} on {result['model']}: zero-shot test acc "
        f"{result['zero_shot_test_acc']:.4f} -> tuned {result['test_acc']:.4f} "
        f"(best dev {result['best_dev_acc']:.4f}; {result['api_calls']} API calls, "
        f"{result['generations']} generations, {result['wall_s']:.0f} s; stopped by {result['stop_reason']})"
    )
    print(f"results: {result['files']['result']}  log: {result['files']['log']}  plot: {result['files']['curve']}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from blackbox.compare import compare, markdown_table

    optimizers = [name.strip() for name in args.optimizers.split(",") if name.strip()]
    config = _config_from_args(args, optimizers[0] if optimizers else "cma")
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
    with BackboneClient(args.server) as client:
        client.wait_ready(timeout=args.timeout)
        print(json.dumps(dataclasses.asdict(client.get_info()), indent=2))
    return 0


def _tasks(args: argparse.Namespace) -> int:
    from blackbox.tasks import get_task

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
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blackbox", description="Gradient-free black-box tuning of language models")
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
    info.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the server")
    info.set_defaults(run=_info)
    tasks = commands.add_parser("tasks", help="list the built-in tasks")
    tasks.set_defaults(run=_tasks)
    export = commands.add_parser("export", help="write a run's tuned delta (best_z.npy) as adapter weights (PEFT layout)")
    export.add_argument("--run", dest="run_dir", required=True, metavar="DIR", help="the run folder of `blackbox tune`")
    export.add_argument("--out", required=True, help="folder for the adapter (must be empty or new)")
    export.add_argument("--model", help="the model to build the delta on (default: the run's)")
    export.add_argument("--device", default="cpu", help="device to materialise on")
    export.add_argument("--dtype", help="dtype to load the model in (default: the run's)")
    export.add_argument("--fold-prefix", action="store_true",
                        help="soft prompt: put the template's tokens ahead of the prompt (e.g. BOS) into the "
                             "exported virtual tokens, so PEFT's prepended prompt reproduces the run exactly; "
                             "deep prompt (causal model, prompt ahead of the texts): export PEFT prefix tuning, "
                             "the keys and values of those tokens and the prompt at every layer")
    export.add_argument("--overwrite", action="store_true", help="replace the files of an earlier export in --out")
    export.set_defaults(run=_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (BackboneError, TaskError, RunDirError, ValueError, RuntimeError, TimeoutError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
