"""Shared helpers of scripts/load_test.py and scripts/fuzz_server.py: checks of a backbone
server made the way an outside client makes them, over loopback only.

* `loopback_address` refuses a --server that is not 127.x, localhost or ::1.
* `ServerProcess` starts `python -m backbone_server --model M --host 127.0.0.1 --port 0`,
  reads the port from the line it prints ("backbone server listening on HOST:PORT;
  loading ..."), drains its output in a thread (kept in memory and in a log file, so it
  never blocks on a full pipe), waits for health SERVING, reads its RSS from
  /proc/PID/status and stops it (SIGTERM, then SIGKILL).
* `server_help` / `server_takes`: the flags the server's --help lists (API keys are being
  added: `--api-keys FILE` of `write_keys_file`, `--state-db FILE`).
* `client_kwargs`: `api_key=` for BackboneClient only when its __init__ takes it.

Nothing here imports torch: the scripts stay light clients of the server.
"""

from __future__ import annotations

import collections
import ctypes
import hashlib
import inspect
import ipaddress
import json
import math
import os
import re
import resource
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import grpc  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

LISTENING = re.compile(r"backbone server listening on (\S+):(\d+);")
SERVING = health_pb2.HealthCheckResponse.SERVING
MAX_LOG_LINES = 200_000


def log(message: str) -> None:
    """Progress goes to stderr; stdout carries only the final JSON line."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def emit(result: dict) -> None:
    """The one JSON line on stdout (NaN and infinities become null: strict JSON)."""
    print(json.dumps(_strict(result)), flush=True)


def _strict(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def loopback_address(address: str) -> str:
    """`address` (HOST:PORT, [::1]:PORT) when HOST is loopback; exits with status 2 otherwise."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    ok = bool(sep) and port.isdigit() and 0 < int(port) < 65536
    if ok and host != "localhost":
        try:
            ok = ipaddress.ip_address(host).is_loopback
        except ValueError:
            ok = False
    if not ok:
        raise SystemExit(f"error: --server must be a loopback HOST:PORT (127.x, localhost, [::1]), got {address!r}; "
                         "these checks never leave this machine")
    return address


def percentile_ms(seconds: list[float], q: float) -> float | None:
    if not seconds:
        return None
    ordered = sorted(seconds)
    index = min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))
    return round(ordered[index] * 1e3, 3)


# ---- what the server and the client support ------------------------------------------

_HELP: dict[str, str] = {}


def server_help(python: str = sys.executable) -> str:
    """`python -m backbone_server --help` (run once per process; it imports torch, ~5 s)."""
    if python not in _HELP:
        result = subprocess.run([python, "-m", "backbone_server", "--help"], cwd=REPO, capture_output=True,
                                text=True, timeout=120, env=_server_env())
        _HELP[python] = result.stdout + result.stderr
    return _HELP[python]


def server_takes(flag: str, python: str = sys.executable) -> bool:
    return re.search(rf"(^|[\s,\[]){re.escape(flag)}(?![\w-])", server_help(python)) is not None


def client_takes_api_key() -> bool:
    from blackbox.client import BackboneClient

    return "api_key" in inspect.signature(BackboneClient.__init__).parameters


def client_kwargs(api_key: str | None) -> dict:
    """Keyword arguments for BackboneClient: api_key only where it takes one."""
    return {"api_key": api_key} if api_key and client_takes_api_key() else {}


def auth_metadata(api_key: str | None) -> tuple:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


def write_keys_file(directory: Path, names: list[str], quota_calls: int = 10_000_000, max_sessions: int = 4,
                    max_examples: int = 20_000) -> tuple[Path, dict[str, str]]:
    """A keys file of fresh keys, one tenant per name; returns (path, {name: key})."""
    keys = {name: secrets.token_urlsafe(24) for name in names}
    tenants = [{"name": name, "key_sha256": hashlib.sha256(key.encode("utf-8")).hexdigest(),
                "quota_calls": quota_calls, "max_sessions": max_sessions, "max_examples": max_examples}
               for name, key in keys.items()]
    path = directory / "api_keys.json"
    path.write_text(json.dumps({"tenants": tenants}, indent=1))
    os.chmod(path, 0o600)
    return path, keys


def health(address: str, metadata: tuple = (), timeout: float = 5.0) -> str:
    """The server's health status name, or "no answer: CODE"."""
    channel = grpc.insecure_channel(address)
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout, metadata=metadata).status
        return health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    except grpc.RpcError as error:
        return f"no answer: {error.code().name}"
    finally:
        channel.close()


def wait_serving(address: str, metadata: tuple = (), timeout: float = 120.0, process: "ServerProcess | None" = None
                 ) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if process is not None and not process.alive():
            raise RuntimeError(f"the server exited ({process.returncode()}) before serving:\n{process.tail()}")
        last = health(address, metadata, timeout=max(0.2, min(5.0, deadline - time.monotonic())))
        if last == "SERVING":
            return
        time.sleep(0.25)
    raise TimeoutError(f"no SERVING health from {address} after {timeout:g} s ({last})")


# ---- the server as a subprocess --------------------------------------------------------

def _server_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # not Linux: the parent's finally still stops it
        pass


class ServerProcess:
    """`python -m backbone_server` on 127.0.0.1, a free port, its output drained."""

    def __init__(self, model: str = "tiny-llama", extra_args: list[str] | None = None, device: str = "cpu",
                 memory_mb: int = 0, log_path: Path | None = None, python: str = sys.executable):
        self.model = model
        self.command = [python, "-m", "backbone_server", "--model", model, "--host", "127.0.0.1", "--port", "0"]
        if device and device != "auto":
            self.command += ["--device", device]
        self.command += list(extra_args or [])
        self.memory_mb = memory_mb
        self.log_path = log_path
        self.lines: list[str] = []
        self.dropped_lines = 0
        self._tail = collections.deque(maxlen=60)
        self._listening = threading.Event()
        self._lock = threading.Lock()
        self.port: int | None = None
        self.process: subprocess.Popen | None = None
        self._drain: threading.Thread | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def start(self, timeout: float = 120.0) -> "ServerProcess":
        log(f"starting {' '.join(self.command[1:])}")
        self.process = subprocess.Popen(self.command, cwd=REPO, env=_server_env(), stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        errors="replace", bufsize=1, preexec_fn=_die_with_parent)
        if self.memory_mb > 0:  # bounds what one request can make it allocate (address space)
            limit = self.memory_mb * 2 ** 20
            try:
                resource.prlimit(self.process.pid, resource.RLIMIT_AS, (limit, limit))
            except (OSError, ValueError) as error:
                log(f"could not cap the server's memory: {error}")
        self._drain = threading.Thread(target=self._read, name="server-output", daemon=True)
        self._drain.start()
        deadline = time.monotonic() + timeout
        while not self._listening.wait(0.2):
            if not self.alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server printed no listening line:\n{self.tail()}")
        return self

    def _read(self) -> None:
        handle = self.log_path.open("a") if self.log_path else None
        try:
            for line in self.process.stdout:
                line = line.rstrip("\n")
                if handle:
                    handle.write(line + "\n")
                    handle.flush()
                with self._lock:
                    if len(self.lines) < MAX_LOG_LINES:
                        self.lines.append(line)
                    else:
                        self.dropped_lines += 1
                    self._tail.append(line)
                if self.port is None:
                    match = LISTENING.search(line)
                    if match:
                        self.port = int(match.group(2))
                        self._listening.set()
        finally:
            if handle:
                handle.close()

    def wait_serving(self, metadata: tuple = (), timeout: float = 120.0) -> None:
        wait_serving(self.address, metadata, timeout, process=self)
        log(f"server pid {self.pid} serving {self.model} on {self.address} (RSS {self.rss_mb()} MB)")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def rss_mb(self) -> float | None:
        return rss_mb(self.pid) if self.alive() else None

    def line_count(self) -> int:
        with self._lock:
            return len(self.lines)

    def lines_since(self, index: int) -> list[str]:
        with self._lock:
            return self.lines[index:]

    def tail(self) -> str:
        with self._lock:
            return "\n".join(self._tail)

    def stop(self, grace: float = 10.0) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                log("the server ignored SIGTERM; killing it")
                self.process.kill()
                self.process.wait(10)
        if self._drain is not None:
            self._drain.join(5)
        return self.process.returncode

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def rss_mb(pid: int | None) -> float | None:
    """VmRSS of a process in MiB (None when it is not readable)."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        return None
    return None


class RssSampler:
    """The peak VmRSS of a process, sampled in a thread while it runs."""

    def __init__(self, pid: int | None, every: float = 0.1):
        self.pid = pid
        self.every = every
        self.peak: float | None = rss_mb(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            value = rss_mb(self.pid)
            if value is not None and (self.peak is None or value > self.peak):
                self.peak = value

    def __enter__(self) -> "RssSampler":
        if self.pid is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2)
        value = rss_mb(self.pid)
        if value is not None and (self.peak is None or value > self.peak):
            self.peak = value


def temp_dir(prefix: str) -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix=prefix)
