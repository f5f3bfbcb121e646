"""Load test of a backbone server as outside clients see it: N tenants at once, each with
its own private task, scoring random populations for T seconds.

    python scripts/load_test.py --tenants 4 --seconds 20              # starts its own tiny-llama server
    python scripts/load_test.py --server 127.0.0.1:50051 --tenants 4 --seconds 20 [--api-key KEY ...]

Each tenant is a thread with its own BackboneClient and its own session: texts of random
words, labels from a per-tenant secret (an HMAC bit of the text), a 2-class verbalizer
["no", "yes"] and a small soft prompt (DeltaSpec kind "prompt"). It loops Evaluate calls
of random populations until the time is up, keeping a sample of (tenant, z, scores).
After the load every sampled request is scored again alone, one at a time, and compared
bit for bit (np.array_equal of ce_loss, hinge_loss and accuracy): `crosstalk` counts the
responses that differ by more than --atol (1e-5), i.e. a tenant's scores that depended on
what else was running; `inexact` those that differ within it, in their last bits only
(the server merged them into a forward with other tenants' rows: issue 16's scheduler,
`--batch-window-ms`, whose batch shapes round differently).

Without --server it starts `python -m backbone_server --model M --host 127.0.0.1 --port 0`
(on the CPU unless --server-device says otherwise) and stops it at the end; if the
server takes `--api-keys` (and BackboneClient takes api_key=) it writes a keys file with
one fresh key per tenant and every tenant sends its own. It reads the server's RSS
(/proc/PID/status VmRSS; with --server only given --server-pid) before the load, at its
peak and after all sessions are closed.

Progress goes to stderr; the last line on stdout is one JSON object: `calls_per_s`
(candidates scored per second: each candidate is one API call of the black box),
`requests_per_s`, `latency_ms_p50` / `latency_ms_p99` (of Evaluate requests, overall and
in `per_tenant`), `errors` (failed calls that are not a declared limit, by code in
`errors_by_code`), `limited` (RESOURCE_EXHAUSTED: a quota or bound the server declares),
`crosstalk` (of `crosstalk_checked` re-scored samples), `rss_mb_before`, `rss_mb_peak`,
`rss_mb_after`.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import hmac
import random
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import service_harness as harness  # noqa: E402

import numpy as np  # noqa: E402

from blackbox.client import BackboneClient, BackboneError, DeltaSpec  # noqa: E402

# Words of the tiny models' vocabulary (each one token), so texts stay short everywhere.
WORDS = """the a an and or but of to in on at for with by from as is was were be it this that there
here he she they we you his her their our your my not maybe true false same meaning question answer
topic category news great bad good terrible movie film book story world sports business tech company
education artist athlete office building natural village animal plant album written science politics
game team market stock price school university music band player president minister car ship train
river mountain town species tree song novel play love hate best worst very really too so all one two
three new old first last more most some any what which who when where why how""".split()
TEMPLATES = ["{text_a} It was {mask}", "{text_a} so it is {mask}", "{text_a} the answer is {mask}"]
VERBALIZER = ["no", "yes"]
# Statuses a server declares as its limits (quotas, session and population bounds): not errors.
LIMIT_CODES = {"RESOURCE_EXHAUSTED"}
MAX_TENANTS = 64
MAX_SECONDS = 3600


class Tenant:
    """One client with its own private task and session."""

    def __init__(self, index: int, address: str, api_key: str | None, args: argparse.Namespace):
        self.index = index
        self.name = f"t{index}"
        self.address = address
        self.api_key = api_key
        self.args = args
        rng = random.Random(args.seed * 1_000_003 + index)
        self.secret = rng.randbytes(16)
        self.examples = []
        for _ in range(args.examples):
            text = " ".join(rng.sample(WORDS, rng.randint(3, 8)))
            label = hmac.new(self.secret, text.encode(), hashlib.sha256).digest()[0] & 1
            self.examples.append(_Example(text, None, label))
        self.template = TEMPLATES[index % len(TEMPLATES)]
        self.delta = DeltaSpec(kind="prompt", prompt_length=args.prompt_length, intrinsic_dim=args.intrinsic_dim,
                               seed=rng.randrange(2 ** 31))
        self.rng = np.random.default_rng(args.seed * 7919 + index)
        self.latencies: list[float] = []
        self.requests = 0
        self.candidates = 0
        self.errors: collections.Counter = collections.Counter()
        self.limited: collections.Counter = collections.Counter()
        self.samples: list[tuple[np.ndarray, tuple]] = []
        self.seen = 0
        self.client: BackboneClient | None = None
        self.session = None
        self.first_error = ""

    def _failed(self, error: Exception) -> None:
        code = error.code.name if isinstance(error, BackboneError) else f"client:{type(error).__name__}"
        (self.limited if code in LIMIT_CODES else self.errors)[code] += 1
        if not self.first_error:
            self.first_error = str(error)[:300]
            harness.log(f"tenant {self.name}: {self.first_error}")

    def open(self) -> bool:
        try:
            self.client = BackboneClient(self.address, **harness.client_kwargs(self.api_key))
            self.session = self.client.create_session({"train": self.examples}, self.template, VERBALIZER, self.delta)
            return True
        except Exception as error:  # counted; the tenant then sits the load out
            self._failed(error)
            return False

    def run(self, start: threading.Barrier, stop_at: list[float]) -> None:
        ready = self.open()
        try:
            start.wait(timeout=300)
        except threading.BrokenBarrierError:
            return
        if not ready:
            return
        popsize, dim = self.args.popsize, self.session.z_dim
        while time.monotonic() < stop_at[0]:
            z = self.rng.normal(0.0, 1.0, size=(popsize, dim)).astype(np.float32)
            began = time.perf_counter()
            try:
                scores = self.session.evaluate("train", z)
            except Exception as error:
                self._failed(error)
                time.sleep(0.05)  # a failing server is not hammered in a tight loop
                continue
            self.latencies.append(time.perf_counter() - began)
            self.requests += 1
            self.candidates += popsize
            self._keep(z, (scores.ce_loss, scores.hinge_loss, scores.accuracy))

    def _keep(self, z: np.ndarray, response: tuple) -> None:
        """A reservoir sample of the responses, `--samples` per tenant."""
        self.seen += 1
        if len(self.samples) < self.args.samples:
            self.samples.append((z, response))
        else:
            slot = int(self.rng.integers(self.seen))
            if slot < self.args.samples:
                self.samples[slot] = (z, response)

    def rescore(self) -> tuple[int, int, int]:
        """(checked, differing, inexact): each sampled request scored again alone. A
        response that differs by more than the tolerance is cross-talk; one that differs
        within it only in its last bits is `inexact` (the server merged it into a forward
        with other requests' rows, whose batch shape rounds differently)."""
        checked = differing = inexact = 0
        for z, (ce, hinge, accuracy) in self.samples:
            try:
                again = self.session.evaluate("train", z)
            except Exception as error:
                self._failed(error)
                continue
            checked += 1
            pairs = ((ce, again.ce_loss), (hinge, again.hinge_loss), (accuracy, again.accuracy))
            if all(np.array_equal(a, b) for a, b in pairs):
                continue
            if all(np.allclose(a, b, rtol=0, atol=self.args.atol) for a, b in pairs):
                inexact += 1
                continue
            differing += 1
            harness.log(f"tenant {self.name}: crosstalk: a sample scored {ce.tolist()} under load and "
                        f"{again.ce_loss.tolist()} alone")
        return checked, differing, inexact

    def close(self) -> None:
        if self.session is not None:
            try:
                self.session.close()
            except Exception as error:
                self._failed(error)
        if self.client is not None:
            self.client.close()

    def report(self) -> dict:
        return {"tenant": self.name, "requests": self.requests, "candidates": self.candidates,
                "latency_ms_p50": harness.percentile_ms(self.latencies, 50),
                "latency_ms_p99": harness.percentile_ms(self.latencies, 99),
                "errors": sum(self.errors.values()), "limited": sum(self.limited.values())}


class _Example:
    """What BackboneClient.create_session reads of an example."""

    __slots__ = ("text_a", "text_b", "label")

    def __init__(self, text_a: str, text_b: str | None, label: int):
        self.text_a, self.text_b, self.label = text_a, text_b, label


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", help="HOST:PORT of a running server (loopback only); default: start one")
    parser.add_argument("--tenants", type=int, default=4, help=f"concurrent tenants (1 .. {MAX_TENANTS})")
    parser.add_argument("--seconds", type=float, default=10.0, help=f"length of the load (at most {MAX_SECONDS})")
    parser.add_argument("--popsize", type=int, default=8, help="candidates per Evaluate call")
    parser.add_argument("--model", default="tiny-llama", help="model of the server this script starts")
    parser.add_argument("--examples", type=int, default=16, help="examples of each tenant's task")
    parser.add_argument("--intrinsic-dim", type=int, default=8)
    parser.add_argument("--prompt-length", type=int, default=4)
    parser.add_argument("--samples", type=int, default=16, help="responses per tenant re-scored alone afterwards")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--atol", type=float, default=1e-5,
                        help="a response further than this from the same request scored alone is cross-talk; one "
                             "within it that differs in its last bits is counted as inexact (merged forwards)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat the load with new sessions this many times (server memory after each "
                             "round, rss_mb_after_rounds, shows whether closed sessions leave memory behind)")
    parser.add_argument("--api-key", action="append", default=[],
                        help="with --server: a key to send (repeat: tenants take them in turn)")
    parser.add_argument("--server-pid", type=int, help="with --server: its process id, to read its RSS")
    parser.add_argument("--server-device", default="cpu", help="device of the server this script starts (auto, cpu, cuda)")
    parser.add_argument("--server-memory-mb", type=int, default=0,
                        help="cap the started server's address space (0: no cap)")
    parser.add_argument("--server-log", type=Path, help="write the started server's output here")
    args = parser.parse_args(argv)
    if not 1 <= args.tenants <= MAX_TENANTS:
        parser.error(f"--tenants must be 1 .. {MAX_TENANTS}")
    if not 0 < args.seconds <= MAX_SECONDS:
        parser.error(f"--seconds must be in (0, {MAX_SECONDS}]")
    if not 1 <= args.popsize <= 1024 or not 1 <= args.examples <= 10_000 or not 0 <= args.samples <= 1000:
        parser.error("--popsize 1..1024, --examples 1..10000 and --samples 0..1000")
    if args.server:
        harness.loopback_address(args.server)
    elif args.api_key or args.server_pid:
        parser.error("--api-key and --server-pid go with --server")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    server = None
    workdir = harness.temp_dir("load_test_")
    auth = "open"
    try:
        if args.server:
            address, pid = args.server, args.server_pid
            keys = [args.api_key[i % len(args.api_key)] for i in range(args.tenants)] if args.api_key else \
                [None] * args.tenants
            auth = "api-keys" if args.api_key else "open"
        else:
            extra: list[str] = []
            keys = [None] * args.tenants
            if harness.server_takes("--api-keys"):
                if harness.client_takes_api_key():
                    path, named = harness.write_keys_file(Path(workdir.name), [f"t{i}" for i in range(args.tenants)])
                    keys = list(named.values())
                    extra += ["--api-keys", str(path)]
                    if harness.server_takes("--state-db"):
                        extra += ["--state-db", str(Path(workdir.name) / "state.db")]
                    auth = "api-keys"
                else:
                    harness.log("the server takes --api-keys but BackboneClient takes no api_key: running it open")
            server = harness.ServerProcess(args.model, extra, args.server_device, args.server_memory_mb,
                                           args.server_log).start()
            server.wait_serving(harness.auth_metadata(keys[0]))
            address, pid = server.address, server.pid
        return run(args, address, pid, keys, auth)
    finally:
        if server is not None:
            server.stop()
        workdir.cleanup()


def run(args: argparse.Namespace, address: str, pid: int | None, keys: list, auth: str) -> int:
    harness.wait_serving(address, harness.auth_metadata(keys[0]), timeout=60)
    rss_before = harness.rss_mb(pid)
    tenants, rounds_after, peak, elapsed = [], [], 0.0, 0.0
    checked = differing = inexact = 0
    for round_number in range(1, max(1, args.rounds) + 1):
        if args.rounds > 1:
            harness.log(f"round {round_number} of {args.rounds}")
        more, seconds, round_peak, round_checked, round_differing, round_inexact = one_round(
            args, address, pid, keys, auth)
        inexact += round_inexact
        tenants += more
        elapsed += seconds
        peak = max(peak, round_peak or 0)
        checked += round_checked
        differing += round_differing
        time.sleep(0.5)
        rounds_after.append(harness.rss_mb(pid))
    rss_after = rounds_after[-1]

    latencies = [s for t in tenants for s in t.latencies]
    errors = sum((t.errors for t in tenants), collections.Counter())
    limited = sum((t.limited for t in tenants), collections.Counter())
    requests = sum(t.requests for t in tenants)
    candidates = sum(t.candidates for t in tenants)
    result = {
        "script": "load_test", "server": address, "auth": auth, "model": args.model, "tenants": args.tenants,
        "seconds": args.seconds, "rounds": args.rounds, "elapsed_s": round(elapsed, 3), "popsize": args.popsize,
        "examples_per_tenant": args.examples,
        "requests": requests, "candidates": candidates,
        "calls_per_s": round(candidates / elapsed, 2) if elapsed > 0 else None,
        "requests_per_s": round(requests / elapsed, 2) if elapsed > 0 else None,
        "latency_ms_p50": harness.percentile_ms(latencies, 50),
        "latency_ms_p99": harness.percentile_ms(latencies, 99),
        "per_tenant": [t.report() for t in tenants[:args.tenants]] if args.rounds == 1 else
        [{"round": 1 + i // args.tenants, **t.report()} for i, t in enumerate(tenants)],
        "errors": sum(errors.values()), "errors_by_code": dict(errors),
        "limited": sum(limited.values()), "limited_by_code": dict(limited),
        "crosstalk": differing, "crosstalk_checked": checked, "inexact": inexact, "atol": args.atol,
        "rss_mb_before": rss_before, "rss_mb_peak": peak or None, "rss_mb_after": rss_after,
        "rss_mb_after_rounds": rounds_after,
    }
    harness.log(f"{candidates / max(elapsed, 1e-9):.1f} candidates/s, p50 {result['latency_ms_p50']} ms, "
                f"p99 {result['latency_ms_p99']} ms, {result['errors']} errors, crosstalk {differing}/{checked}, "
                f"RSS {rss_before} -> {peak} -> {rss_after} MB (after each round: {rounds_after})")
    harness.emit(result)
    return 0


def one_round(args: argparse.Namespace, address: str, pid: int | None, keys: list, auth: str):
    """N tenants for T seconds, then their samples re-scored alone and their sessions closed:
    (tenants, seconds, RSS peak, samples checked, samples differing)."""
    tenants = [Tenant(i, address, keys[i], args) for i in range(args.tenants)]
    start = threading.Barrier(len(tenants) + 1)
    stop_at = [float("inf")]
    threads = [threading.Thread(target=t.run, args=(start, stop_at), name=t.name, daemon=True) for t in tenants]
    harness.log(f"{len(tenants)} tenants on {address} ({auth}): creating sessions")
    with harness.RssSampler(pid) as sampler:
        for thread in threads:
            thread.start()
        start.wait(timeout=300)
        began = time.monotonic()
        stop_at[0] = began + args.seconds
        harness.log(f"load for {args.seconds:g} s: popsize {args.popsize}, "
                    f"{sum(t.session is not None for t in tenants)} sessions open")
        next_report = began + 5
        while any(thread.is_alive() for thread in threads):
            for thread in threads:
                thread.join(0.5)
            now = time.monotonic()
            if now >= next_report and now < stop_at[0]:
                done = sum(t.candidates for t in tenants)
                harness.log(f"{now - began:5.1f} s: {sum(t.requests for t in tenants)} requests, {done} candidates, "
                            f"{sum(sum(t.errors.values()) for t in tenants)} errors, "
                            f"RSS peak {sampler.peak} MB")
                next_report = now + 5
        elapsed = time.monotonic() - began
        harness.log(f"load done after {elapsed:.1f} s; re-scoring the samples alone")
        checked = differing = inexact = 0
        for tenant in tenants:
            if tenant.session is not None:
                one, two, three = tenant.rescore()
                checked += one
                differing += two
                inexact += three
        for tenant in tenants:
            tenant.close()
    return tenants, elapsed, sampler.peak, checked, differing, inexact


if __name__ == "__main__":
    sys.exit(main())
