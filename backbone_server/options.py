"""Command-line options of the server, shared by `python -m backbone_server` and
`blackbox serve` (kept free of torch imports so the client's CLI can build its parser)."""

from __future__ import annotations

import argparse


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m",
                        help="smollm2-135m (bundled), tiny-llama, tiny-roberta, tiny-gpt2, a local HF model "
                             "folder or a local .gguf file")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for all interfaces)")
    parser.add_argument("--port", type=int, default=50051, help="port to bind (0 picks a free one)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--device-map", default=None,
                        help="place a model folder or the bundled model across all visible devices with "
                             "accelerate (auto, balanced, sequential), for models larger than one GPU; "
                             "replaces --device (default: none, the whole model on --device)")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    parser.add_argument("--max-batch-tokens", type=int, default=0,
                        help="memory bound: (candidate, example) rows x tokens in one forward "
                             "(0: derived from free device memory, at most 8192 on a CPU; GetInfo reports the plan)")
    parser.add_argument("--prefix-cache-mb", type=int, default=0,
                        help="memory for the text's keys and values kept across calls and sessions "
                             "(0: 10%% of the memory free after loading; GetInfo's cache_report shows its use)")
    parser.add_argument("--no-prefix-reuse", action="store_true",
                        help="recompute the tokens before the prompt for every candidate (for comparison)")
    add_subspace_arguments(parser)
    parser.add_argument("--allow-subspace-uploads", action="store_true",
                        help="accept learned subspaces from clients (UploadSubspace, `blackbox subspace upload`), "
                             "at most 16, each within --max-subspace-mb; off, only --subspace files are hosted")
    parser.add_argument("--allow-gradients", action="store_true",
                        help="answer Gradient calls (white-box comparisons); off, the server is a pure black box")


def add_subspace_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--subspace", action="append", default=[], metavar="NAME=FILE",
                        help="host a learned subspace (`blackbox subspace fit`) under NAME: sessions select it with "
                             "the projection subspace:NAME; repeat for several")
    parser.add_argument("--max-subspace-mb", type=float, default=64,
                        help="refuse subspace files (--subspace, uploads) larger than this")
