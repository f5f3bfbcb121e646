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
    add_service_arguments(parser)


def add_service_arguments(parser: argparse.ArgumentParser) -> None:
    """Who may call, over what, and what each call may ask for (README: running it as a service)."""
    service = parser.add_argument_group("service")
    service.add_argument("--api-keys", metavar="FILE",
                         help='tenants and their limits, JSON: {"tenants": [{"name", "key_sha256", "quota_calls", '
                              '"max_sessions", "max_examples"}]} (`blackbox keys new` makes a key and its line); '
                              "calls then need `authorization: Bearer KEY`. Without it the server is open and binds "
                              "loopback only")
    service.add_argument("--insecure-open", action="store_true",
                         help="serve a non-loopback --host without --api-keys (anyone who reaches it can use it)")
    service.add_argument("--tls-cert", metavar="PEM", help="TLS certificate chain (with --tls-key): clients then "
                                                           "connect with grpcs://HOST:PORT or --tls-ca")
    service.add_argument("--tls-key", metavar="PEM", help="the TLS certificate's private key")
    service.add_argument("--state-db", metavar="FILE",
                         help="SQLite file of what survives restarts (each tenant's metered calls); default: next "
                              "to --api-keys (KEYS.state.sqlite), in memory for an open server")
    service.add_argument("--allow-logits", action="store_true",
                         help="return verbalizer logits when asked (Evaluate return_logits; tune's label bias "
                              "needs them); always on for an open server")
    service.add_argument("--session-ttl", type=float, default=30 * 60, metavar="SECONDS",
                         help="close a session unused for this long (0: never); a client that dies loses its "
                              "session to this, never blocks others")
    service.add_argument("--max-sessions", type=int, default=64, help="sessions held at once, all tenants together")
    service.add_argument("--max-examples", type=int, default=200_000,
                         help="examples in one session, all splits together (a tenant's max_examples may be lower)")
    service.add_argument("--cache-mb", type=float, default=256,
                         help="memory for evaluated ranges' batches, all sessions together (least recently used "
                              "out first; recomputed when needed)")
    service.add_argument("--session-cache-mb", type=float, default=64, help="the same, for one session")
    service.add_argument("--max-message-mb", type=float, default=256, help="the largest request accepted")
    service.add_argument("--max-delta-mb", type=float, default=512,
                         help="what one session's delta may pin: its projections, start and scales (a dense "
                              "projection is d x D floats; fastfood and sparse ones store far less)")
    service.add_argument("--batch-window-ms", type=float, default=None,
                         help="how long a step (a chunk of an Evaluate or Predict, a token of a Generate) waits "
                              "for other requests' steps to share its forward, when others are in flight (0: never "
                              "merge; default: 2 on a GPU, 0 on a CPU)")
    service.add_argument("--merge-max-tokens", type=int, default=None,
                         help="the most tokens a merged forward holds (0: as many as memory allows; default: that "
                              "on a GPU, 1024 on a CPU, past which a bigger forward measured no cheaper "
                              "per token: scripts/bench_forward_sizes.py)")
    service.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (0: a free one)")
    service.add_argument("--metrics-host", default="127.0.0.1", help="address the metrics bind (default loopback)")


def add_subspace_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--subspace", action="append", default=[], metavar="NAME=FILE",
                        help="host a learned subspace (`blackbox subspace fit`) under NAME: sessions select it with "
                             "the projection subspace:NAME; repeat for several")
    parser.add_argument("--max-subspace-mb", type=float, default=64,
                        help="refuse subspace files (--subspace, uploads) larger than this")
