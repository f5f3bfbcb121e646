"""Fuzzes a backbone server as an outside client can: N requests spread over every RPC
method of the Backbone service, each with a 10 s deadline.

    python scripts/fuzz_server.py --requests 2000 [--seed 0]       # starts its own tiny-llama server
    python scripts/fuzz_server.py --server 127.0.0.1:50051 --requests 2000 [--api-key KEY --api-key KEY2]

The methods come from `backbone_pb2.DESCRIPTOR.services_by_name["Backbone"].methods`, so a
new method is fuzzed as soon as it is in the generated code. Requests mix

* raw random bytes as the body (a generic `channel.unary_unary` without serializers);
* malformed but parsable messages, built from each message's descriptor: huge and
  negative ints, NaN and infinite floats, strings up to ~1 MB, random repeated lengths,
  nested messages, Tensors of odd shapes, dtypes and data lengths, a real session's id
  with a broken z, words the service knows (delta kinds, projections, templates);
* mutations of valid requests (a working CreateSession, Evaluate, ...): bytes flipped,
  cut, inserted or duplicated, or one field set to an odd value;
* with API keys: calls with no key or a wrong key (must answer UNAUTHENTICATED) and calls
  on another tenant's session (must answer NOT_FOUND);
* alternating with all of these until it runs out (~170 requests), a deterministic sweep
  (`--no-sweep` leaves it out): the known-odd Tensors in every request that has one, every
  variant of a broken subspace file, and each field of each method's valid request set to
  an extreme in turn.

Fuzzed sessions that get created are closed at once, and uploads mostly reuse the name of
a subspace hosted already (the server parses the file before refusing the name), so the
fuzzing never fills the server's session or upload slots.

Every request stays under 2 MB and the run under --max-seconds. After each call the
server must still answer its health check (and, when this script started it, still be
running): otherwise it counts as a crash (the script then restarts its own server and
goes on, at most --max-restarts times). Afterwards `alive_after` says whether the health
is SERVING and a small session made before the fuzzing scores the same population to the
same bits as it did then.

Without --server the script starts `python -m backbone_server --model tiny-llama --host
127.0.0.1 --port 0` on the CPU (with --allow-gradients and --allow-subspace-uploads where
it takes them, so those paths are fuzzed too, and its address space capped at
--server-memory-mb so that a request asking for huge tensors fails instead of exhausting
the machine), with a keys file of two fresh tenants when it takes --api-keys.

Progress goes to stderr; the last line on stdout is one JSON object: `crashes`,
`internal` (INTERNAL or UNKNOWN answers), `hangs` (DEADLINE_EXCEEDED), `by_code`,
`by_method`, `auth_failures` (a key or session check that answered otherwise than it
must), `alive_after`, and `internal_examples`: one entry per distinct failure (method,
how the request was malformed, the server's log line and exception when this script
started the server, the request's bytes in base64 when small, or all of them under
--save-internal) so it can be reproduced. `--trace FILE` writes one JSON line per request.
"""

from __future__ import annotations

import argparse
import base64
import collections
import io
import json
import math
import random
import secrets
import struct
import sys
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import service_harness as harness  # noqa: E402

import grpc  # noqa: E402
import numpy as np  # noqa: E402
from google.protobuf import text_format  # noqa: E402
from google.protobuf.descriptor import FieldDescriptor as FD  # noqa: E402
from google.protobuf.message_factory import GetMessageClass  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from blackbox.v1 import backbone_pb2 as pb  # noqa: E402
from blackbox.v1.channel import client_options  # noqa: E402

SERVICE = pb.DESCRIPTOR.services_by_name["Backbone"]
DEADLINE_S = 10.0
MAX_REQUEST_BYTES = 2 * 2 ** 20 - 4096  # every body stays under 2 MB
BUDGET_BYTES = 1_500_000  # what one generated message may spend on strings, bytes and elements
LONG_STRING = 1_000_000
MAX_REQUESTS = 100_000
INTERNAL_CODES = {"INTERNAL", "UNKNOWN"}
MAX_EXAMPLES_KEPT = 12

I32 = [0, 1, -1, 2, 3, 7, 8, 16, 64, 255, 256, 1000, 4095, 4096, 4097, 65535, 65536, 10 ** 6, 2 ** 30,
       2 ** 31 - 1, -2 ** 31, -2]
I64 = I32 + [2 ** 32, 2 ** 32 + 1, 2 ** 53, 2 ** 62, 2 ** 63 - 1, -2 ** 63]
U32 = [0, 1, 2, 7, 255, 2 ** 16, 2 ** 31, 2 ** 32 - 1]
U64 = U32 + [2 ** 32, 2 ** 53, 2 ** 63, 2 ** 64 - 1]
FLOATS = [0.0, -0.0, 1.0, -1.0, 0.5, 2.0, 100.0, 1e-45, 1e-38, 1e30, 3.4e38, -3.4e38, math.inf, -math.inf, math.nan]
DOUBLES = FLOATS + [1e308, 5e-324, -1e308]
RANGES = {FD.TYPE_INT32: (-2 ** 31, 2 ** 31 - 1, I32), FD.TYPE_SINT32: (-2 ** 31, 2 ** 31 - 1, I32),
          FD.TYPE_SFIXED32: (-2 ** 31, 2 ** 31 - 1, I32), FD.TYPE_INT64: (-2 ** 63, 2 ** 63 - 1, I64),
          FD.TYPE_SINT64: (-2 ** 63, 2 ** 63 - 1, I64), FD.TYPE_SFIXED64: (-2 ** 63, 2 ** 63 - 1, I64),
          FD.TYPE_UINT32: (0, 2 ** 32 - 1, U32), FD.TYPE_FIXED32: (0, 2 ** 32 - 1, U32),
          FD.TYPE_UINT64: (0, 2 ** 64 - 1, U64), FD.TYPE_FIXED64: (0, 2 ** 64 - 1, U64)}
WORDS = "the a film good bad great no yes it was very movie story not best worst and is so".split()
ODD_STRINGS = ["", " ", "\x00", "{", "}", "{}", "{{", "%s", "\\", "|", "||", "\u202e", "\ufeff", "\U0001F600",
               "<mask>", "<s>", "</s>", "<pad>", "<unk>", "\n", "\t\t", "../../etc/passwd", "NaN", "-1"]
TEMPLATES = ["{text_a} It was {mask}", "{prompt} {text_a} It was {mask}", "{text_a} {prompt} so it is {mask}",
             "{text_a} {text_b} It was {mask}", "{mask} {text_a}", "{text_a} {mask} {prompt}", "{text_a}{mask}",
             "{mask}", "{text_a}", "{text_a} {text_a} {mask}", "{text_a} {mask} {mask}", "{unknown} {text_a} {mask}",
             "{text_a {mask}", "{{text_a}} {mask}", "{text_a} It was {mask}" + " good" * 5000,
             "{prompt}{prompt} {text_a} {mask}", "{text_b} {mask}", "{text_a} <mask> {mask}", "{TEXT_A} {mask}",
             "{text_a} {prompt}{mask}", "{0} {text_a} {mask}", "{text_a!r} {mask}"]
VERBALIZER_WORDS = ["no", "yes", "bad", "great", "great|good", "good|great", "no|no", "|", "|yes", "a", "A",
                    "zzzz", "<mask>", "film", "the", " ", ""]
KIND_EXTRAS = ["prompt+lora", "lora+prompt", "unipelt:lora+adapter", "unipelt:prompt+lora", "adamix:lora",
               "adamix4:lora", "adamix0:lora", "adamix99999999999999999999:lora", "adamix-1:lora", "adamix2:prompt",
               "unipelt:", "prompt+", "+", ":", "foo:bar", "lora+lora", "prompt+deep-prompt", "PROMPT", " prompt",
               "prompt ", "prompt+lora+adapter+bias", "unipelt:lora", "adamix:adamix:lora", "prefix+prompt"]
PROJECTION_EXTRAS = ["subspace:", "subspace:none", "subspace:../x", "subspace:" + "a" * 300, "Normal", "dense", ""]
TARGETS = ["q_proj", "v_proj", "k_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "self_attn.q_proj", "mlp",
           "lm_head", "embed_tokens", "norm", "c_attn", "query", "", ".", " q_proj", "*", "layers.0.self_attn.q_proj"]
DTYPES = ["float32", "float32", "float32", "", "float16", "float64", "bfloat16", "int8", "int64", "FLOAT32",
          "float32\x00", "<f4", "f4", "complex64", "object"]


def message_class(descriptor):
    return GetMessageClass(descriptor)


def method_path(name: str) -> str:
    return f"/{SERVICE.full_name}/{name}"


def short(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[:limit] + f"...[{len(text)} chars]"


def describe_message(message, limit: int = 300) -> str:
    """text_format of a message with long strings and bytes cut, on one line."""
    copy = message.__class__()
    copy.CopyFrom(message)
    _shorten(copy)
    return short(text_format.MessageToString(copy, as_one_line=True), limit)


def _shorten(message) -> None:
    for field, value in message.ListFields():
        if field.type == FD.TYPE_MESSAGE:
            if field.message_type.GetOptions().map_entry:
                continue
            for item in (value if field.is_repeated else [value]):
                _shorten(item)
        elif field.type in (FD.TYPE_STRING, FD.TYPE_BYTES):
            cut = (lambda v: v if len(v) <= 40 else v[:24] + (f"...[{len(v)}]" if field.type == FD.TYPE_STRING
                                                              else f"...[{len(v)}]".encode()))
            if field.is_repeated:
                items = [cut(v) for v in value[:6]]
                del value[:]
                value.extend(items)
            else:
                setattr(message, field.name, cut(value))
        elif field.is_repeated and len(value) > 6:
            items = list(value[:6])
            del value[:]
            value.extend(items)


class ServerGone(Exception):
    """The server stopped answering and cannot be restarted."""


class Budget:
    def __init__(self, size: int):
        self.left = size

    def take(self, size: int) -> int:
        size = max(0, min(size, self.left))
        self.left -= size
        return size


class Target:
    """A real session on the server, the fuzzer's or another tenant's."""

    def __init__(self, session_id: str, z_dim: int, split: str = "train"):
        self.id, self.z_dim, self.split = session_id, z_dim, split


class Fuzzer:
    def __init__(self, args: argparse.Namespace, address: str, keys: list[str | None], server=None):
        self.args = args
        self.rng = random.Random(args.seed)
        self.np_rng = np.random.default_rng(args.seed)
        self.server = server  # a harness.ServerProcess when this script started it
        self.keys = keys  # [main tenant's key, another tenant's key] (None, None when open)
        self.keyed = keys[0] is not None
        self.methods = list(SERVICE.methods)
        self.counts = collections.Counter()
        self.by_method: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.by_mode: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.internal_groups: dict[tuple, dict] = {}
        self.hang_examples: list[dict] = []
        self.crash_examples: list[dict] = []
        self.auth_examples: list[dict] = []
        self.crashes = self.internal = self.hangs = self.auth_failures = self.restarts = 0
        self.sessions_created = self.sessions_closed = 0
        self.upload_counter = 0
        self.aborted = ""
        self.targets_recreated = 0
        self.trace = args.trace.open("w") if args.trace else None
        self._sweep = None
        self.connect(address)

    # ---- connection, sessions ------------------------------------------------------------

    def connect(self, address: str) -> None:
        self.address = address
        self.channel = grpc.insecure_channel(address, options=client_options())
        self.raw = {m.name: self._raw_method(m) for m in self.methods}
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    def _raw_method(self, method):
        """A callable (body, timeout, metadata) -> response bytes; a streaming method gets
        the body as its one request and answers its last response."""
        if not (method.client_streaming or method.server_streaming):
            return self.channel.unary_unary(method_path(method.name), request_serializer=None,
                                            response_deserializer=None)
        stream = self.channel.stream_stream(method_path(method.name), request_serializer=None,
                                            response_deserializer=None)

        def call(body, timeout, metadata):
            responses = list(stream(iter([body]), timeout=timeout, metadata=metadata))
            return responses[-1] if responses else b""
        return call

    def health(self) -> str:
        try:
            status = self.health_stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5.0,
                                            metadata=self.metadata()).status
            return health_pb2.HealthCheckResponse.ServingStatus.Name(status)
        except grpc.RpcError as error:
            return f"no answer: {error.code().name}"

    def metadata(self, which: int = 0) -> tuple:
        return harness.auth_metadata(self.keys[which])

    def call(self, method: str, body: bytes, metadata: tuple | None = None, timeout: float = DEADLINE_S):
        """(code name, details, response bytes or None, seconds)."""
        began = time.monotonic()
        try:
            response = self.raw[method](body, timeout=timeout, metadata=self.metadata() if metadata is None
                                        else metadata)
            return "OK", "", response, time.monotonic() - began
        except grpc.RpcError as error:
            return error.code().name, error.details() or "", None, time.monotonic() - began

    def checked_call(self, method: str, message, which: int = 0):
        code, details, response, _ = self.call(method, message.SerializeToString(), self.metadata(which))
        if code != "OK":
            raise RuntimeError(f"{method} failed with {code}: {details}")
        return message_class(self.method(method).output_type).FromString(response)

    def method(self, name: str):
        return SERVICE.methods_by_name[name]

    def setup(self) -> None:
        """GetInfo, the fuzzer's target session, the reference session, another tenant's."""
        self.info = self.checked_call("GetInfo", pb.GetInfoRequest())
        self.kinds = {kind.name: kind for kind in self.info.kinds}
        self.delta_kinds = list(self.info.delta_kinds) or ["prompt"]
        self.projections = list(self.info.projection_kinds) or ["normal"]
        self.target = self.new_session("prompt", seed=1)
        self.reference = self.new_session("prompt", seed=2)
        self.reference_z = self.np_rng.normal(size=(3, self.reference.z_dim)).astype(np.float32)
        self.reference_scores = self.score(self.reference, self.reference_z)
        self.other = self.new_session("prompt", seed=3, which=1) if self.keyed else None
        if self._sweep is None and not self.args.no_sweep:
            self._sweep = self.sweep()

    def valid_create(self, kind: str = "prompt", seed: int = 0, examples: int = 3) -> pb.CreateSessionRequest:
        info = self.kinds.get(kind)
        takes_prompt = info.takes_prompt if info is not None else kind in ("prompt", "deep-prompt", "prefix")
        texts = ["a great film", "a bad film", "very good", "not good", "the worst movie", "best story"]
        return pb.CreateSessionRequest(
            splits=[pb.Split(name="train", examples=[pb.Example(text_a=texts[i % len(texts)], label=i % 2)
                                                     for i in range(examples)])],
            template="{text_a} It was {mask}", verbalizer=["no", "yes"],
            delta=pb.DeltaSpec(kind=kind, prompt_length=2 if takes_prompt else 0, intrinsic_dim=4, seed=seed))

    def valid_create_variant(self) -> tuple[pb.CreateSessionRequest, str]:
        """A CreateSession that should work, in one of the forms the server offers."""
        rng = self.rng
        combos = [k for k in ("prompt+lora", "unipelt:lora+adapter", "adamix2:lora", "lora+bias")
                  if all(part in self.kinds for part in k.split(":")[-1].split("+"))]
        kind = rng.choice(self.delta_kinds + combos)
        request = self.valid_create(kind, rng.randrange(2 ** 31), rng.randint(2, 6))
        parts = kind.split(":")[-1].split("+")
        if not any(self.kinds[p].takes_prompt for p in parts if p in self.kinds):
            request.delta.prompt_length = 0
        request.delta.intrinsic_dim = rng.choice([4, 8, 16, 32])
        notes = [kind]
        if rng.random() < 0.3:
            request.delta.projection = rng.choice([p for p in self.projections if not p.startswith("subspace:")]
                                                  or ["normal"])
            notes.append(request.delta.projection)
        if rng.random() < 0.2:
            request.template = "{text_a} {text_b} It was {mask}"
            for example in request.splits[0].examples:
                example.text_b = rng.choice(["so good", "not good", "the film"])
            notes.append("pairs")
        if rng.random() < 0.2:
            request.splits.add(name="dev", examples=[pb.Example(text_a="a good film", text_b=request.splits[0]
                                                                .examples[0].text_b, label=1)])
            notes.append("two splits")
        if rng.random() < 0.15:
            request.verbalizer[:] = ["bad|terrible", "great|good"]
            notes.append("several words per class")
        if kind in self.kinds and self.kinds[kind].per_layer_z and rng.random() < 0.3:
            request.delta.per_layer_z = True
            notes.append("per_layer_z")
        if rng.random() < 0.1:
            request.delta.said = True
            notes.append("said")
        if request.delta.prompt_length and rng.random() < 0.15:
            request.delta.init_text = "a great film"
            notes.append("init_text")
        return request, f"valid ({', '.join(notes)})"

    def new_session(self, kind: str = "prompt", seed: int = 0, which: int = 0) -> Target:
        response = self.checked_call("CreateSession", self.valid_create(kind, seed), which)
        return Target(response.session_id, response.z_dim or 4)

    def evaluate_request(self, target: Target, population: int = 2) -> pb.EvaluateRequest:
        z = self.np_rng.normal(size=(population, target.z_dim)).astype(np.float32)
        return pb.EvaluateRequest(session_id=target.id, split=target.split,
                                  z=pb.Tensor(data=z.tobytes(), shape=list(z.shape), dtype="float32"))

    def score(self, target: Target, z: np.ndarray) -> tuple:
        request = pb.EvaluateRequest(session_id=target.id, split=target.split,
                                     z=pb.Tensor(data=z.astype("<f4").tobytes(), shape=list(z.shape), dtype="float32"))
        response = self.checked_call("Evaluate", request)
        return tuple(np.frombuffer(t.data, "<f4").copy() for t in (response.ce_loss, response.hinge_loss,
                                                                   response.accuracy))

    def close_quietly(self, session_id: str, which: int = 0) -> None:
        self.call("CloseSession", pb.CloseSessionRequest(session_id=session_id).SerializeToString(),
                  self.metadata(which))

    def ensure_targets(self) -> None:
        """Recreates a target session that a fuzzed CloseSession (or an expiry) closed."""
        for name, which in (("target", 0), ("other", 1)):
            target = getattr(self, name)
            if target is None:
                continue
            code, *_ = self.call("Evaluate", self.evaluate_request(target, 1).SerializeToString(),
                                 self.metadata(which))
            if code == "NOT_FOUND":  # a fuzzed CloseSession closed it
                self.targets_recreated += 1
                setattr(self, name, self.new_session("prompt", seed=1 if which == 0 else 3, which=which))

    # ---- values from descriptors ---------------------------------------------------------

    def pick_int(self, field) -> int:
        low, high, interesting = RANGES[field.type]
        hint = INT_HINTS.get(field.name)
        r = self.rng.random()
        if hint and r < 0.5:
            return max(low, min(high, self.rng.choice(hint)))
        if r < 0.8:
            return max(low, min(high, self.rng.choice(interesting)))
        if r < 0.92:
            return max(low, min(high, self.rng.randint(-10, 100)))
        return self.rng.randint(low, high)

    def pick_float(self, double: bool = False) -> float:
        if self.rng.random() < 0.8:
            return self.rng.choice(DOUBLES if double else FLOATS)
        value = self.rng.uniform(-1e6, 1e6)
        return value if double else struct.unpack("<f", struct.pack("<f", value))[0]

    def random_text(self, budget: Budget) -> str:
        r = self.rng.random()
        if r < 0.25:
            return " ".join(self.rng.choice(WORDS) for _ in range(self.rng.randint(1, 12)))
        if r < 0.45:
            return self.rng.choice(ODD_STRINGS)
        if r < 0.65:
            size = budget.take(self.rng.randint(1, 64))
            return "".join(chr(self._codepoint()) for _ in range(size))
        if r < 0.96:
            size = budget.take(self.rng.randint(1, 400))
            return "".join(self.rng.choice("abcdefghij {}|<>") for _ in range(size))
        size = budget.take(self.rng.randint(10_000, LONG_STRING))  # ~1 MB at most
        unit = self.rng.choice(["a", "good ", "x y ", "{text_a} ", "\u00e9", "|"])
        return (unit * (size // len(unit.encode()) + 1))[: max(0, size // len(unit.encode()))]

    def _codepoint(self) -> int:
        while True:
            point = self.rng.choice([self.rng.randint(0, 127), self.rng.randint(128, 0x7FF),
                                     self.rng.randint(0x800, 0xFFFF), self.rng.randint(0x10000, 0x10FFFF)])
            if not 0xD800 <= point <= 0xDFFF:
                return point

    def pick_string(self, field, budget: Budget) -> str:
        hints = self.string_hints(field.name)
        if hints and self.rng.random() < 0.6:
            value = self.rng.choice(hints)
            return value if len(value) <= budget.left else ""
        return self.random_text(budget)

    def string_hints(self, name: str) -> list[str] | None:
        if name == "session_id":
            target = self.target.id
            return [target, target, target, target.upper(), target + " ", target[:-1], "0" * 32, "",
                    target + target, "../" + target]
        if name == "split":
            return ["train", "train", "dev", "", "TRAIN", "train\x00"]
        if name == "template":
            return TEMPLATES
        if name == "verbalizer":
            return VERBALIZER_WORDS
        if name == "kind":
            return self.delta_kinds + KIND_EXTRAS
        if name == "projection":
            return self.projections + PROJECTION_EXTRAS
        if name == "targets":
            return TARGETS
        if name == "name":
            return ["train", "dev", "test", "", "x" * 65, "sub-1", "a.b", "../x", "\x00", "fz" + str(self.rng.random())]
        if name == "loss":
            return ["ce", "hinge", "", "mse", "CE"]
        if name == "init_text":
            return ["great film", "", "x" * 2001, "\x00", "{mask}", "<mask>"]
        if name in ("text_a", "text_b"):
            return ["a great film", "", " ", "good " * 3000, "<mask>", "{text_a}", "\x00"]
        if name == "dtype":
            return DTYPES
        return None

    def pick_bytes(self, field, budget: Budget) -> bytes:
        if field.name == "data" and field.containing_type.name.startswith("UploadSubspace") and self.rng.random() < 0.6:
            return self.subspace_bytes(budget)
        size = budget.take(self.rng.choice([0, 1, 4, 7, 8, 16, 100, self.rng.randint(0, 4096),
                                            self.rng.randint(0, 200_000)]))
        return self.rng.randbytes(size)

    def pick_scalar(self, field, budget: Budget):
        kind = field.type
        if kind in RANGES:
            return self.pick_int(field)
        if kind == FD.TYPE_BOOL:
            return self.rng.random() < 0.5
        if kind == FD.TYPE_FLOAT:
            return self.pick_float()
        if kind == FD.TYPE_DOUBLE:
            return self.pick_float(double=True)
        if kind == FD.TYPE_STRING:
            return self.pick_string(field, budget)
        if kind == FD.TYPE_BYTES:
            return self.pick_bytes(field, budget)
        if kind == FD.TYPE_ENUM:
            values = [v.number for v in field.enum_type.values]
            return self.rng.choice(values + [max(values) + 1, -1, 2 ** 31 - 1])
        raise TypeError(f"no scalar of type {kind}")

    def repeated_length(self, budget: Budget, element_cost: int) -> int:
        r = self.rng.random()
        n = 0 if r < 0.2 else self.rng.randint(1, 3) if r < 0.75 else self.rng.randint(4, 64) if r < 0.95 \
            else self.rng.randint(65, 2000)
        return min(n, budget.left // max(1, element_cost))

    def random_message(self, descriptor, budget: Budget, depth: int = 0):
        """A message of `descriptor` with random fields (each set with probability ~0.7)."""
        if descriptor.full_name == pb.Tensor.DESCRIPTOR.full_name and self.rng.random() < 0.75:
            return self.random_tensor(budget)[0]
        message = message_class(descriptor)()
        for field in descriptor.fields:
            if self.rng.random() < 0.3:
                continue
            self.fill_field(message, field, budget, depth)
        return message

    def fill_field(self, message, field, budget: Budget, depth: int) -> None:
        if field.type == FD.TYPE_MESSAGE:
            if field.message_type.GetOptions().map_entry:
                key_field, value_field = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
                container = getattr(message, field.name)
                for _ in range(self.repeated_length(budget, 8)):
                    key = self.pick_scalar(key_field, budget)
                    if value_field.type == FD.TYPE_MESSAGE:
                        container[key].CopyFrom(self.random_message(value_field.message_type, budget, depth + 1))
                    else:
                        container[key] = self.pick_scalar(value_field, budget)
                return
            if depth >= 4:
                return
            if field.is_repeated:
                container = getattr(message, field.name)
                for _ in range(self.repeated_length(budget, 16)):
                    container.add().CopyFrom(self.random_message(field.message_type, budget, depth + 1))
            else:
                getattr(message, field.name).CopyFrom(self.random_message(field.message_type, budget, depth + 1))
            return
        if field.is_repeated:
            container = getattr(message, field.name)
            container.extend(self.pick_scalar(field, budget) for _ in range(self.repeated_length(budget, 4)))
        else:
            setattr(message, field.name, self.pick_scalar(field, budget))

    def random_tensor(self, budget: Budget, dim: int | None = None) -> tuple[pb.Tensor, str]:
        """An odd Tensor and a few words on what is odd about it."""
        dim = dim or self.target.z_dim
        rng = self.rng
        population = rng.choice([1, 2, 3, 64, 0, 4096, 4097, 2 ** 31 - 1])
        shapes = [[population, dim], [population, dim], [dim], [population, dim, 1], [], [population, dim + 1],
                  [0, dim], [2 ** 32, 2 ** 32], [2 ** 62, 4], [-1, dim], [-population, -dim], [1, 2 ** 31],
                  [2 ** 63 - 1, 2], [2 ** 32, dim], [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
                                                     1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
                                                     1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
                                                     1, 1, dim],
                  [rng.choice(I64) for _ in range(rng.randint(0, 6))]]
        shape = rng.choice(shapes)
        dtype = rng.choice(DTYPES)
        wrapped = int(np.prod(np.array(shape, dtype=np.int64), dtype=np.int64)) if shape else 1  # as int64 wraps
        r = rng.random()
        if 0 <= wrapped * 4 <= min(budget.left, 1_000_000) and r < 0.7:
            count = wrapped
            values = rng.choice(["normal", "zeros", "nan", "inf", "huge", "denormal", "mixed"])
            data = self._floats(count, values)
            what = f"{values} values, data for the shape"
        elif r < 0.85:
            size = budget.take(max(0, wrapped * 4 + rng.choice([-4, -1, 1, 3, 4]))) if 0 <= wrapped * 4 < 1_000_000 \
                else budget.take(rng.randint(0, 64))
            data = rng.randbytes(size)
            what = f"{size} bytes of data (the shape wants {wrapped * 4})"
        else:
            size = budget.take(rng.choice([0, 1, 3, 8, rng.randint(0, 100_000)]))
            data = rng.randbytes(size)
            what = f"{size} random bytes of data"
        budget.take(len(data))
        return pb.Tensor(data=data, shape=shape, dtype=dtype), f"z shape={short(str(shape), 80)} dtype={dtype!r}, {what}"

    def _floats(self, count: int, values: str) -> bytes:
        if count == 0:
            return b""
        if values == "normal":
            array = self.np_rng.normal(size=count)
        elif values == "zeros":
            array = np.zeros(count)
        elif values == "nan":
            array = np.full(count, np.nan)
        elif values == "inf":
            array = np.full(count, np.inf)
        elif values == "huge":
            array = np.full(count, 3.4e38)
        elif values == "denormal":
            array = np.full(count, 1e-45)
        else:
            array = self.np_rng.choice(np.array([0.0, 1.0, -1e30, 1e30, 3.4e38, np.nan, -np.inf], dtype=np.float64),
                                       size=count)
        return array.astype("<f4").tobytes()

    def subspace_bytes(self, budget: Budget, variant: str | None = None, option: int | None = None) -> bytes:
        """An npz subspace file: a plausible one or a broken one."""
        rng, buffer = self.rng, io.BytesIO()
        k = rng.choice([1, 2, 4])
        delta_size = rng.choice([2 * self.info.hidden_size, 3 * self.info.hidden_size, 1, 7])
        basis = self.np_rng.normal(size=(k, delta_size)).astype(np.float32)
        scales = np.ones(k, np.float32)
        meta = {"kind": "prompt", "prompt_length": 2, "model": self.info.model_name}
        variant = variant or rng.choice(SUBSPACE_VARIANTS)
        self.subspace_detail = ""
        arrays = {"basis": basis, "scales": scales, "meta": np.array(json.dumps(meta))}
        if variant == "nan":
            arrays["basis"] = np.full_like(basis, np.nan)
        elif variant == "shape":
            arrays["scales"] = np.ones(k + 1, np.float32)
            arrays["basis"] = basis.reshape(-1)
        elif variant == "meta":
            arrays["meta"] = np.array(rng.choice(["[]", "not json", "{\"kind\": 3}", "null", "1e999"]))
        elif variant == "missing":
            del arrays[rng.choice(list(arrays))]
        elif variant == "dtype":
            arrays["basis"] = basis.astype(rng.choice([np.float16, np.int64, np.complex64, np.bool_]))
        if variant == "pickle":
            np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
        elif variant in ("header-shape", "header-garbage"):  # an .npy header that lies, a few bytes of data
            choices = HEADER_SHAPES if variant == "header-shape" else HEADER_GARBAGE
            header = choices[option if option is not None else rng.randrange(len(choices))]
            self.subspace_detail = f"basis.npy header {short(header, 70)!r}"
            with zipfile.ZipFile(buffer, "w") as archive:
                archive.writestr("basis.npy", _npy_header(header) + rng.randbytes(rng.choice([0, 16, 1024])))
                for name, array in (("scales", scales), ("meta", arrays["meta"])):
                    item = io.BytesIO()
                    np.save(item, array)
                    archive.writestr(f"{name}.npy", item.getvalue())
        elif variant in ("deflate-corrupt", "compression-method"):
            np.savez_compressed(buffer, **arrays)
        elif variant == "compressed-big":  # 64 MiB of zeros in a few hundred KiB
            np.savez_compressed(buffer, basis=np.zeros((2 ** 14, 2 ** 10), np.float32), scales=np.ones(2 ** 14, np.float32),
                                meta=np.array(json.dumps(meta)))
        else:
            np.savez(buffer, **arrays)
        self.subspace_variant = variant
        data = buffer.getvalue()
        if variant == "truncated":
            data = data[: rng.randint(0, len(data))]
        elif variant == "deflate-corrupt":  # a compressed member whose stream is broken
            data = bytearray(data)
            start = 30 + sum(struct.unpack("<HH", data[26:30]))
            for i in range(start, min(len(data), start + 8)):
                data[i] ^= 0xFF
            data = bytes(data)
        elif variant == "compression-method":  # a method zipfile does not know (99), in both headers
            data = bytearray(data)
            data[8:10] = struct.pack("<H", 99)
            central = data.find(b"PK\x01\x02")
            if central >= 0:
                data[central + 10:central + 12] = struct.pack("<H", 99)
            data = bytes(data)
        return data[: budget.take(len(data))]

    # ---- valid requests and their mutations ----------------------------------------------

    def valid_request(self, method) -> tuple[object, str]:
        name = method.input_type.name
        if name == "CreateSessionRequest":
            return self.valid_create_variant()
        if name == "UploadSubspaceRequest":
            data = self.subspace_bytes(Budget(2 ** 20))
            return pb.UploadSubspaceRequest(name=self.upload_name(), data=data), \
                f"valid-ish (npz: {self.subspace_variant}{', ' + self.subspace_detail if self.subspace_detail else ''})"
        # Any other request (Evaluate, Gradient, a new method): the target session's fields where it has them.
        message = message_class(method.input_type)()
        fields = method.input_type.fields_by_name
        if "session_id" in fields:
            message.session_id = self.target.id
        if "split" in fields and fields["split"].type == FD.TYPE_STRING:
            message.split = self.target.split
        z = fields.get("z")
        if z is not None and z.type == FD.TYPE_MESSAGE and z.message_type.full_name == pb.Tensor.DESCRIPTOR.full_name:
            message.z.CopyFrom(self.evaluate_request(self.target, self.rng.choice([1, 2, 4])).z)
        if "loss" in fields and fields["loss"].type == FD.TYPE_STRING:
            message.loss = "ce"
        return message, "valid"

    def upload_name(self) -> str:
        """Mostly the name of a subspace hosted already: the server parses the file before it
        refuses the name, so the parser is fuzzed without filling its few upload slots."""
        self.upload_counter += 1
        return HOSTED_NAME if self.rng.random() < 0.9 else f"fz{self.upload_counter}"

    def leaves(self, message, prefix: str = "", depth: int = 0) -> list[tuple]:
        """(parent, field, index or None, path) of every field of a message, set or not."""
        found = []
        for field in message.DESCRIPTOR.fields:
            path = f"{prefix}{field.name}"
            if field.type == FD.TYPE_MESSAGE and not field.message_type.GetOptions().map_entry:
                found.append((message, field, None, path))
                if depth < 4:
                    if field.is_repeated:
                        for i, item in enumerate(getattr(message, field.name)[:8]):
                            found += self.leaves(item, f"{path}[{i}].", depth + 1)
                    elif message.HasField(field.name):
                        found += self.leaves(getattr(message, field.name), f"{path}.", depth + 1)
            elif field.type == FD.TYPE_MESSAGE:  # a map: replaced whole
                found.append((message, field, None, path))
            else:
                found.append((message, field, None, path))
                if field.is_repeated:
                    found += [(message, field, i, f"{path}[{i}]") for i in range(min(8, len(getattr(message, field.name))))]
        return found

    def mutate_field(self, message) -> str:
        parent, field, index, path = self.rng.choice(self.leaves(message))
        budget = Budget(BUDGET_BYTES)
        container = getattr(parent, field.name) if field.is_repeated else None
        if field.type == FD.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
            parent.ClearField(field.name)
            self.fill_field(parent, field, budget, 1)
            return f"{path} := random map"
        if field.type == FD.TYPE_MESSAGE:
            if field.is_repeated:
                action = self.rng.choice(["clear", "add", "duplicate"])
                if action == "clear":
                    del container[:]
                elif action == "add":
                    container.add().CopyFrom(self.random_message(field.message_type, budget, 1))
                else:
                    items = list(container) * self.rng.choice([2, 10, 100])
                    if items and sum(i.ByteSize() for i in items) < BUDGET_BYTES:
                        for item in items[len(container):]:
                            container.add().CopyFrom(item)
                return f"{path}: {action}"
            if self.rng.random() < 0.2:
                parent.ClearField(field.name)
                return f"{path} cleared"
            if field.message_type.full_name == pb.Tensor.DESCRIPTOR.full_name:
                tensor, what = self.random_tensor(budget)
                getattr(parent, field.name).CopyFrom(tensor)
                return f"{path} := {what}"
            getattr(parent, field.name).CopyFrom(self.random_message(field.message_type, budget, 1))
            return f"{path} := random {field.message_type.name}"
        if field.is_repeated and index is None:
            action = self.rng.choice(["clear", "extend"])
            if action == "clear":
                del container[:]
                return f"{path} cleared"
            values = [self.pick_scalar(field, budget) for _ in range(self.repeated_length(budget, 4))]
            container.extend(values)
            return f"{path} += {short(repr(values), 80)}"
        value = self.pick_scalar(field, budget)
        if index is None:
            setattr(parent, field.name, value)
        else:
            container[index] = value
        return f"{path} := {short(repr(value), 80)}"

    def mutate_bytes(self, body: bytes) -> tuple[bytes, str]:
        rng, data = self.rng, bytearray(body)
        action = rng.choice(["flip", "flip", "overwrite", "truncate", "insert", "duplicate", "append-field"])
        if not data and action != "append-field":
            action = "insert"
        if action == "flip":
            flips = rng.randint(1, 8)
            for _ in range(flips):
                i = rng.randrange(len(data))
                data[i] ^= 1 << rng.randrange(8)
            what = f"{flips} bit(s) flipped"
        elif action == "overwrite":
            i = rng.randrange(len(data))
            n = rng.randint(1, 8)
            data[i:i + n] = rng.randbytes(n)
            what = f"bytes {i}..{i + n} overwritten"
        elif action == "truncate":
            i = rng.randrange(len(data))
            del data[i:]
            what = f"cut to {i} of {len(body)} bytes"
        elif action == "insert":
            i = rng.randint(0, len(data))
            n = rng.randint(1, 16)
            data[i:i] = rng.randbytes(n)
            what = f"{n} random bytes inserted at {i}"
        elif action == "duplicate":
            i = rng.randrange(len(data))
            j = rng.randint(i, len(data))
            times = rng.choice([1, 2, 10])
            chunk = bytes(data[i:j]) * times
            data[j:j] = chunk[: max(0, MAX_REQUEST_BYTES - len(data))]
            what = f"bytes {i}..{j} repeated {times}x"
        else:
            number = rng.choice([rng.randint(1, 20), rng.randint(21, 2 ** 29 - 1)])
            wire = rng.choice([0, 1, 2, 5, 3, 4, 6, 7])
            tag = _varint((number << 3) | wire)
            payload = {0: _varint(rng.choice(U64)), 1: rng.randbytes(8), 5: rng.randbytes(4),
                       2: _varint(n := rng.choice([0, 3, 100, 2 ** 31])) + rng.randbytes(min(n, 64))}.get(wire, b"")
            data += tag + payload
            what = f"field {number} wire type {wire} appended"
        return bytes(data[:MAX_REQUEST_BYTES]), what

    # ---- the sweep: every odd value once ----------------------------------------------------

    def sweep(self):
        """Requests that try each known-odd value once, deterministically: special Tensors
        in every request that has one, every subspace-file variant, and each field of each
        method's valid request set to an extreme (min, max, -1, NaN, inf, "", ~200 KB, ...).
        They alternate with the random requests until they run out."""
        for method in self.methods:
            tensors = [f for f in method.input_type.fields if f.type == FD.TYPE_MESSAGE
                       and f.message_type.full_name == pb.Tensor.DESCRIPTOR.full_name and not f.is_repeated]
            for field in tensors:
                for shape, data, dtype, what in self.special_tensors():
                    message, _ = self.valid_request(method)
                    getattr(message, field.name).CopyFrom(pb.Tensor(data=data, shape=shape, dtype=dtype))
                    yield self._sweep_item(method, message, f"{field.name} := {what}")
        upload = next((m for m in self.methods if m.input_type.name == "UploadSubspaceRequest"), None)
        if upload is not None:
            for variant in SUBSPACE_VARIANTS:
                for option in range(len(HEADER_SHAPES) if variant == "header-shape" else
                                    len(HEADER_GARBAGE) if variant == "header-garbage" else 1):
                    data = self.subspace_bytes(Budget(2 ** 20), variant, option)
                    message = pb.UploadSubspaceRequest(name=HOSTED_NAME, data=data)
                    yield self._sweep_item(upload, message, f"data := npz {variant}"
                                           + (f" ({self.subspace_detail})" if self.subspace_detail else ""))
        for method in self.methods:
            if method.name == "CloseSession":  # never the target's id
                valid = pb.CloseSessionRequest(session_id=secrets.token_hex(16))
            else:
                valid, _ = self.valid_request(method)
            for index, (_, field, item, path) in enumerate(self.leaves(valid)):
                if item not in (None, 0):
                    continue
                for value, what in self.extremes(field, item):
                    message = valid.__class__()
                    message.CopyFrom(valid)
                    parent, field, item, path = self.leaves(message)[index]
                    if not self._set(parent, field, item, value):
                        continue
                    yield self._sweep_item(method, message, f"{path} := {what}")

    def _sweep_item(self, method, message, change: str) -> dict:
        body = message.SerializeToString()
        return {"method": method.name, "mode": "sweep", "body": body[:MAX_REQUEST_BYTES], "metadata": self.metadata(),
                "expect": None, "cleanup": None, "what": f"valid {method.input_type.name} with {change}"}

    def special_tensors(self):
        d = self.target.z_dim
        z = self.np_rng.normal(size=(2, d)).astype("<f4")
        yield [2 ** 32, 2 ** 32], b"", "float32", "shape [2**32, 2**32] (its int64 product wraps to 0), no data"
        yield [2 ** 62, 4], b"", "float32", "shape [2**62, 4] (product wraps to 0), no data"
        yield [2 ** 63 - 1, 2], b"", "float32", "shape [2**63-1, 2], no data"
        yield [2 ** 32, d], b"", "float32", f"shape [2**32, {d}], no data"
        yield [0, d], b"", "float32", f"shape [0, {d}]"
        yield [-1, d], z.tobytes(), "float32", f"shape [-1, {d}]"
        yield [1] * 64 + [2, d], z.tobytes(), "float32", f"66-d shape [1, ..., 2, {d}]"
        yield [2, d], z.tobytes()[:-1], "float32", "one byte short"
        yield [2, d], np.full((2, d), np.nan, "<f4").tobytes(), "float32", "NaN values"
        yield [2, d], np.full((2, d), 3.4e38, "<f4").tobytes(), "float32", "values 3.4e38"
        yield [2, d], z.astype("<f2").tobytes(), "float16", "float16 data"
        yield [2, d], z.astype("<f8").tobytes(), "float64", "float64 data"
        yield [2, d], z.tobytes(), "float32\x00", "dtype 'float32\\x00'"
        yield [4097, d], np.zeros((4097, d), "<f4").tobytes(), "float32", "population 4097"

    def extremes(self, field, item) -> list[tuple]:
        """Odd values for one field (item None: a whole repeated field)."""
        if field.is_repeated and item is None:
            return [("clear", "[] (cleared)"), ("many", "its items repeated to ~1000")]
        kind = field.type
        if kind in RANGES:
            low, high, _ = RANGES[kind]
            return [(v, repr(v)) for v in dict.fromkeys([low, high, -1 if low < 0 else high - 1])]
        if kind in (FD.TYPE_FLOAT, FD.TYPE_DOUBLE):
            return [(math.nan, "nan"), (math.inf, "inf"), (-math.inf, "-inf"), (-0.0, "-0.0")]
        if kind == FD.TYPE_STRING:
            return [("", "''"), ("\x00", "'\\x00'"), ("good " * 40_000, "'good ' * 40000 (200 KB)")]
        if kind == FD.TYPE_BYTES:
            return [(b"", "b''"), (self.rng.randbytes(100_000), "100 KB of random bytes")]
        if kind == FD.TYPE_BOOL:
            return [(True, "True")]
        if kind == FD.TYPE_ENUM:
            return [(max(v.number for v in field.enum_type.values) + 1, "an unknown enum value")]
        if kind == FD.TYPE_MESSAGE and not field.message_type.GetOptions().map_entry:
            return [("clear-message", "cleared")]
        return []

    def _set(self, parent, field, item, value) -> bool:
        container = getattr(parent, field.name) if field.is_repeated else None
        if value == "clear" or value == "clear-message":
            if field.is_repeated and item is not None:
                return False
            parent.ClearField(field.name)
        elif value == "many":
            items = list(container)
            if not items:
                return False
            copies = list(items) * (1000 // len(items))
            if field.type == FD.TYPE_MESSAGE:
                if field.message_type.GetOptions().map_entry or sum(i.ByteSize() for i in copies) > BUDGET_BYTES:
                    return False
                for copy in copies[len(items):]:
                    container.add().CopyFrom(copy)
            else:
                container.extend(copies[len(items):])
        elif item is not None:
            container[item] = value
        else:
            setattr(parent, field.name, value)
        return True

    # ---- one request -----------------------------------------------------------------------

    def make_request(self) -> dict:
        """{method, mode, body, metadata, what, expect (codes it must answer, or None), cleanup}."""
        method = self.rng.choice(self.methods)
        r = self.rng.random()
        auth_share = 0.1 if self.keyed else 0.0
        if r < auth_share:
            return self.auth_request()
        r = (r - auth_share) / (1 - auth_share)
        request = {"method": method.name, "metadata": self.metadata(), "expect": None, "cleanup": None}
        if r < 0.2:
            size = self.rng.choice([0, 1, 2, 5, 16, 64, self.rng.randint(0, 4096), self.rng.randint(0, 300_000)])
            body = self.rng.randbytes(size)
            if self.rng.random() < 0.3 and body:  # starts like a real field
                body = bytes([self.rng.choice([0x0A, 0x12, 0x1A, 0x22, 0x08, 0x10])]) + body[1:]
            request.update(mode="raw", body=body, what=f"{size} random bytes")
        elif r < 0.55:
            message = self.random_message(method.input_type, Budget(BUDGET_BYTES))
            request.update(mode="random", body=message.SerializeToString(),
                           what=f"random {method.input_type.name}: {describe_message(message, 220)}")
        else:
            if method.name == "CloseSession":  # a session of its own to close, never the target
                try:
                    throwaway = self.new_session("prompt", seed=self.rng.randrange(2 ** 31)).id
                    request["cleanup"] = throwaway
                    what = "valid"
                except RuntimeError:  # no room for one (a limit): a made-up id
                    throwaway, what = secrets.token_hex(16), "made-up id"
                message = pb.CloseSessionRequest(session_id=throwaway)
            else:
                message, what = self.valid_request(method)
            if self.rng.random() < 0.55 and message.DESCRIPTOR.fields:
                change = "; ".join(self.mutate_field(message) for _ in range(self.rng.choice([1, 1, 1, 2, 3])))
                body = message.SerializeToString()
                what = f"{what} {method.input_type.name} with {change}"
            else:
                body, change = self.mutate_bytes(message.SerializeToString())
                what = f"{what} {method.input_type.name} with {change}"
            request.update(mode="mutated", body=body, what=what)
        if len(request["body"]) > MAX_REQUEST_BYTES:
            request["body"] = request["body"][:MAX_REQUEST_BYTES]
            request["what"] += " (cut to 2 MB)"
        return request

    def auth_request(self) -> dict:
        """A call that must be refused: no key, a wrong key, or another tenant's session."""
        rng = self.rng
        with_session = [m for m in self.methods if "session_id" in m.input_type.fields_by_name]
        choice = rng.choice(["no key", "wrong key", "other tenant's session"])
        if choice == "other tenant's session" and with_session and self.other is not None:
            method = rng.choice(with_session)
            message, _ = self.valid_request(method) if method.name != "CloseSession" else \
                (pb.CloseSessionRequest(), "valid")
            # Either direction: our key on their session, or theirs on ours.
            mine = rng.random() < 0.5
            message.session_id = self.other.id if mine else self.target.id
            if message.DESCRIPTOR.fields_by_name.get("z") is not None and message.HasField("z"):
                owner = self.other if mine else self.target
                z = self.np_rng.normal(size=(1, owner.z_dim)).astype(np.float32)
                message.z.CopyFrom(pb.Tensor(data=z.tobytes(), shape=[1, owner.z_dim], dtype="float32"))
            expect = {"NOT_FOUND"}
            if method.name == "Gradient" and not self.info.gradients_enabled:
                expect.add("PERMISSION_DENIED")  # answered before the session is looked at
            who = "tenant A's key on tenant B's session" if mine else "tenant B's key on tenant A's session"
            return {"method": method.name, "mode": "auth", "body": message.SerializeToString(),
                    "metadata": self.metadata(0 if mine else 1), "expect": expect, "cleanup": None,
                    "what": f"{who}: {describe_message(message, 160)}"}
        method = rng.choice(self.methods)
        if method.name == "CloseSession":
            message = pb.CloseSessionRequest(session_id=self.target.id)  # must not close it
        else:
            message, _ = self.valid_request(method)
        if choice == "no key":
            metadata, what = (), "no authorization metadata"
        else:
            key = self.keys[0]
            metadata, what = rng.choice([
                ((("authorization", "Bearer " + secrets.token_urlsafe(24)),), "a random key"),
                ((("authorization", "Bearer "),), "an empty key"),
                ((("authorization", "Bearer " + key[:-1]),), "the key less its last character"),
                ((("authorization", "Bearer " + key + "x"),), "the key with a character appended"),
                ((("authorization", "Basic " + key),), "the key under the Basic scheme"),
                ((("authorization", "Bearer " + "A" * 4000),), "a 4000-character key"),
                ((("x-api-key", key),), "the key under another metadata name"),
            ])
        return {"method": method.name, "mode": "auth", "body": message.SerializeToString(), "metadata": metadata,
                "expect": {"UNAUTHENTICATED"}, "cleanup": None, "what": f"{what}: {describe_message(message, 160)}"}

    def next_request(self, number: int) -> dict:
        if self._sweep is not None and number % 2 == 1:
            try:
                return next(self._sweep)
            except StopIteration:
                self._sweep = None
        return self.make_request()

    def run_one(self, number: int) -> None:
        request = self.next_request(number)
        method = request["method"]
        line = self.server.line_count() if self.server is not None else 0
        code, details, response, seconds = self.call(method, request["body"], request["metadata"])
        self.counts[code] += 1
        if self.trace is not None:
            self.trace.write(json.dumps({"n": number, "method": method, "mode": request["mode"],
                                         "request": short(request["what"], 300), "bytes": len(request["body"]),
                                         "code": code, "details": short(details, 300),
                                         "ms": round(seconds * 1e3, 2)}) + "\n")
        self.by_method[method][code] += 1
        self.by_mode[request["mode"]][code] += 1
        if code == "OK" and response is not None:
            self.after_ok(method, response, request)
        if request["cleanup"]:
            self.close_quietly(request["cleanup"])
        if code in INTERNAL_CODES:
            self.internal += 1
            self.record_internal(request, code, details, line)
        if code == "DEADLINE_EXCEEDED":
            self.hangs += 1
            if len(self.hang_examples) < MAX_EXAMPLES_KEPT:
                self.hang_examples.append(self.example(request, code, details, seconds))
        if request["expect"] is not None and code not in request["expect"]:
            self.auth_failures += 1
            harness.log(f"request {number}: {method} ({request['what'][:120]}) answered {code}, "
                        f"must answer {'/'.join(sorted(request['expect']))}")
            if len(self.auth_examples) < MAX_EXAMPLES_KEPT:
                self.auth_examples.append(self.example(request, code, details, seconds))
        self.check_alive(request, code, details, seconds)

    def after_ok(self, method: str, response: bytes, request: dict) -> None:
        """Frees what a successful fuzzed call made (sessions), so the fuzzing never fills the server."""
        if method == "CreateSession":
            try:
                session_id = pb.CreateSessionResponse.FromString(response).session_id
            except Exception:
                return
            if session_id:
                self.sessions_created += 1
                which = 0
                if request["metadata"] and self.keyed and request["metadata"] == self.metadata(1):
                    which = 1
                self.close_quietly(session_id, which)
                self.sessions_closed += 1
        elif method == "CloseSession":
            self.ensure_targets()

    def example(self, request: dict, code: str, details: str, seconds: float) -> dict:
        body = request["body"]
        entry = {"method": request["method"], "mode": request["mode"], "request": short(request["what"], 400),
                 "code": code, "details": short(details, 300), "seconds": round(seconds, 3),
                 "request_bytes": len(body)}
        if len(body) <= 1024:
            entry["request_b64"] = base64.b64encode(body).decode()
        return entry

    def record_internal(self, request: dict, code: str, details: str, line: int) -> None:
        headline = exception = where = raised_in = ""
        ours: list[str] = []
        if self.server is not None:
            lines = self._log_after(line)
            headline = next((l for l in lines if "Traceback" not in l and ("ERROR" in l or "Exception" in l)), "")
            exception = next((l for l in reversed(lines) if l and not l[0].isspace() and not l[:4].isdigit()
                              and "Traceback" not in l and ":" in l), "")
            frames = [l.strip() for l in lines if l.strip().startswith("File ")]
            ours = [f for f in frames if "/backbone_server/" in f or "/blackbox/" in f]
            where = ours[-1] if ours else (frames[-1] if frames else "")
            raised_in = frames[-1] if frames else ""
        kind = exception.split(":", 1)[0] if exception else details[:80]
        key = (kind, where) if where else (request["method"], kind)
        group = self.internal_groups.get(key)
        if group is None:
            if len(self.internal_groups) >= 4 * MAX_EXAMPLES_KEPT:
                return
            group = self.example(request, code, details, 0.0)
            group.pop("seconds")
            group.update(count=0, methods=[], server_log=short(headline, 300), exception=short(exception, 300),
                         where=short(where, 300), raised_in=short(raised_in, 300),
                         repo_frames=[short(f, 200) for f in ours[-4:]] if self.server is not None else [])
            try:
                message_class(self.method(request["method"]).input_type).FromString(request["body"])
                group["parses_client_side"] = True
            except Exception:
                group["parses_client_side"] = False
            self.internal_groups[key] = group
            harness.log(f"INTERNAL from {request['method']}: {short(request['what'], 200)}\n    server: "
                        f"{short(headline, 200)}\n    {short(exception, 200)}\n    {where}")
            if self.args.save_internal:
                self.args.save_internal.mkdir(parents=True, exist_ok=True)
                path = self.args.save_internal / f"internal_{len(self.internal_groups):02d}_{request['method']}.bin"
                path.write_bytes(request["body"])
                group["saved_to"] = str(path)
        group["count"] += 1
        if request["method"] not in group["methods"]:
            group["methods"].append(request["method"])

    def _log_after(self, line: int, wait: float = 1.0) -> list[str]:
        """The server's output since `line`, once a traceback in it looks complete."""
        deadline = time.monotonic() + wait
        lines: list[str] = []
        while time.monotonic() < deadline:
            lines = self.server.lines_since(line)
            if any("Traceback" in l for l in lines) and lines and not lines[-1].startswith((" ", "Traceback")):
                time.sleep(0.05)
                return self.server.lines_since(line)
            time.sleep(0.02)
        return lines

    def check_alive(self, request: dict, code: str, details: str, seconds: float) -> None:
        dead = self.server is not None and not self.server.alive()
        status = "exited" if dead else ""
        if not dead:
            for attempt in range(3):
                status = self.health()
                if status == "SERVING":
                    return
                time.sleep(1.0)
        self.crashes += 1
        entry = self.example(request, code, details, seconds)
        entry["health"] = status
        if self.server is not None:
            entry["exit_code"] = self.server.returncode()
            entry["server_tail"] = self.server.tail()[-1500:]
        self.crash_examples.append(entry)
        harness.log(f"CRASH after {request['method']} ({short(request['what'], 200)}): {status}")
        if self.server is None or self.restarts >= self.args.max_restarts:
            self.aborted = f"the server stopped answering ({status})"
            raise ServerGone(self.aborted)
        self.restarts += 1
        self.server.stop(grace=3)
        self.server = self.server.restart()
        self.channel.close()
        self.connect(self.server.address)
        self.setup()


INT_HINTS = {
    "label": [0, 1, 2, -1, 2 ** 31 - 1],
    "start": [0, 1, 2, 3, -1, 2 ** 31 - 1],
    "count": [0, 1, 2, 3, -1, 2 ** 31 - 1],
    "prompt_length": [0, 1, 2, 4, 50, 1000, 4096, 5000, 2 ** 20, 2 ** 31 - 1, -1],
    "intrinsic_dim": [1, 2, 4, 8, 500, 10 ** 5, 10 ** 6, 10 ** 7, 2 ** 31 - 1, 0, -1],
    "rank": [0, 1, 2, 8, 64, 10 ** 6, 2 ** 31 - 1, -1],
    "part_dims": [1, 2, 3, 0, -1, 2 ** 31 - 1],
    "seed": [0, 1, 2 ** 32, 2 ** 63, 2 ** 64 - 1],
    "shape": [0, 1, 4, -1, 2 ** 32, 2 ** 62, 2 ** 63 - 1],
    "size": [0, 1, -1, 2 ** 31 - 1],
}


HOSTED_NAME = "fz-hosted"
HEADER_SHAPES = [f"{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {columns}), }}"
                 for rows, columns in ((2 ** 20, 2 ** 20), (2 ** 40, 4), (2 ** 31, 2 ** 31), (4, 2 ** 62), (-1, 4))]
HEADER_GARBAGE = ["{'descr': '<f4', 'fortran_order': False, 'shape': (2, ",
                  "{'descr': 'O', 'fortran_order': False, 'shape': (2,), }", "{" * 500, "__import__('os')",
                  "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), 'extra': 1, }", "(" * 2000]
SUBSPACE_VARIANTS = ["valid", "nan", "shape", "meta", "missing", "pickle", "compressed-big", "truncated", "dtype",
                     "header-shape", "header-garbage", "deflate-corrupt", "compression-method"]


def _npy_header(header: str) -> bytes:
    """An .npy file's magic, version 1.0 and `header`, padded as numpy pads it."""
    text = header.encode("latin1")
    pad = (-(10 + len(text) + 1)) % 64
    text += b" " * pad + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text


def _varint(value: int) -> bytes:
    value &= 2 ** 64 - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


class OwnServer:
    """This script's own server: started, restarted after a crash, stopped."""

    def __init__(self, args: argparse.Namespace, extra: list[str]):
        self.args, self.extra = args, extra
        self.process = harness.ServerProcess(args.model, extra, args.server_device, args.server_memory_mb,
                                             args.server_log).start()

    def restart(self) -> "OwnServer":
        harness.log("restarting the server")
        fresh = OwnServer(self.args, self.extra)
        fresh.process.wait_serving()
        return fresh

    def __getattr__(self, name):
        return getattr(self.process, name)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", help="HOST:PORT of a running server (loopback only); default: start one")
    parser.add_argument("--requests", type=int, default=1000, help=f"requests to send (at most {MAX_REQUESTS})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-seconds", type=float, default=900, help="stop sending after this long")
    parser.add_argument("--model", default="tiny-llama", help="model of the server this script starts")
    parser.add_argument("--tenants", type=int, default=2, help="tenants in the keys file of the server it starts")
    parser.add_argument("--api-key", action="append", default=[],
                        help="with --server: the key to send; a second one (another tenant's) adds the "
                             "cross-tenant checks")
    parser.add_argument("--server-device", default="cpu", help="device of the server this script starts")
    parser.add_argument("--server-memory-mb", type=int, default=4096,
                        help="cap the started server's address space (0: no cap; use 0 on a GPU)")
    parser.add_argument("--plain-server", action="store_true",
                        help="start the server without --allow-gradients and --allow-subspace-uploads")
    parser.add_argument("--open-server", action="store_true",
                        help="start the server without --api-keys even where it takes them")
    parser.add_argument("--max-restarts", type=int, default=3, help="restarts of its own server after crashes")
    parser.add_argument("--server-log", type=Path, help="write the started server's output here")
    parser.add_argument("--save-internal", type=Path, help="write the body of each distinct INTERNAL request here")
    parser.add_argument("--no-sweep", action="store_true",
                        help="random requests only (no deterministic sweep of odd values alternating with them)")
    parser.add_argument("--trace", type=Path, help="write one JSON line per request here (method, what, code, ms)")
    args = parser.parse_args(argv)
    if not 1 <= args.requests <= MAX_REQUESTS:
        parser.error(f"--requests must be 1 .. {MAX_REQUESTS}")
    if not 2 <= args.tenants <= 16:
        parser.error("--tenants must be 2 .. 16")
    if args.server:
        harness.loopback_address(args.server)
    elif args.api_key:
        parser.error("--api-key goes with --server")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    workdir = harness.temp_dir("fuzz_server_")
    server = None
    auth = "open"
    try:
        if args.server:
            address = args.server
            keys = (args.api_key + [None, None])[:2] if args.api_key else [None, None]
            auth = "api-keys" if args.api_key else "open"
        else:
            extra: list[str] = []
            keys = [None, None]
            if not args.plain_server:
                extra += [flag for flag in ("--allow-gradients", "--allow-subspace-uploads")
                          if harness.server_takes(flag)]
            if harness.server_takes("--api-keys") and not args.open_server:
                path, named = harness.write_keys_file(Path(workdir.name), [f"fuzz{i}" for i in range(args.tenants)],
                                                      max_sessions=8)
                keys = list(named.values())[:2]
                extra += ["--api-keys", str(path)]
                if harness.server_takes("--state-db"):
                    extra += ["--state-db", str(Path(workdir.name) / "state.db")]
                auth = "api-keys"
            server = OwnServer(args, extra)
            server.process.wait_serving()
            address = server.address
        return fuzz(args, address, keys, server, auth)
    finally:
        if server is not None:
            code = server.stop()
            harness.log(f"server stopped ({code})")
        workdir.cleanup()


def fuzz(args: argparse.Namespace, address: str, keys: list, server, auth: str) -> int:
    harness.wait_serving(address, harness.auth_metadata(keys[0]), timeout=60)
    fuzzer = Fuzzer(args, address, keys, server)
    fuzzer.setup()
    pid = server.pid if server is not None else None
    rss_before = harness.rss_mb(pid)
    methods = [m.name for m in fuzzer.methods]
    harness.log(f"fuzzing {address} ({auth}): {args.requests} requests over {', '.join(methods)}")
    began = time.monotonic()
    sent = 0
    with harness.RssSampler(pid) as sampler:
        try:
            for number in range(1, args.requests + 1):
                if time.monotonic() - began > args.max_seconds:
                    fuzzer.aborted = f"--max-seconds {args.max_seconds:g} reached after {sent} requests"
                    break
                fuzzer.run_one(number)
                sent = number
                if number % 25 == 0:
                    fuzzer.ensure_targets()
                if number % 100 == 0:
                    harness.log(f"{number} requests in {time.monotonic() - began:.0f} s: "
                                f"{dict(fuzzer.counts.most_common(6))}, internal {fuzzer.internal}, "
                                f"crashes {fuzzer.crashes}, hangs {fuzzer.hangs}")
        except ServerGone:
            pass
        finally:
            if fuzzer.trace is not None:
                fuzzer.trace.close()
        elapsed = time.monotonic() - began
        sampler.pid = fuzzer.server.pid if fuzzer.server is not None else None
        alive, why = alive_after(fuzzer)
    if fuzzer.server is not None:
        server.process = fuzzer.server.process  # the one to stop, after restarts
    result = {
        "script": "fuzz_server", "server": fuzzer.address, "auth": auth, "seed": args.seed, "requests": sent,
        "elapsed_s": round(elapsed, 3), "methods": methods,
        "crashes": fuzzer.crashes, "internal": fuzzer.internal, "hangs": fuzzer.hangs,
        "auth_failures": fuzzer.auth_failures, "by_code": dict(fuzzer.counts),
        "by_method": {name: dict(counter) for name, counter in fuzzer.by_method.items()},
        "by_mode": {name: dict(counter) for name, counter in fuzzer.by_mode.items()},
        "alive_after": alive, "alive_after_detail": why, "restarts": fuzzer.restarts,
        "fuzzed_sessions_created": fuzzer.sessions_created, "targets_recreated": fuzzer.targets_recreated,
        "internal_examples": sorted(fuzzer.internal_groups.values(), key=lambda g: -g["count"])[:MAX_EXAMPLES_KEPT],
        "internal_distinct": len(fuzzer.internal_groups),
        "hang_examples": fuzzer.hang_examples, "crash_examples": fuzzer.crash_examples,
        "auth_examples": fuzzer.auth_examples,
        "rss_mb_before": rss_before, "rss_mb_peak": sampler.peak, "rss_mb_after": harness.rss_mb(sampler.pid),
    }
    if fuzzer.aborted:
        result["stopped_early"] = fuzzer.aborted
    harness.log(f"{sent} requests in {elapsed:.0f} s: crashes {fuzzer.crashes}, internal {fuzzer.internal} "
                f"({len(fuzzer.internal_groups)} distinct), hangs {fuzzer.hangs}, auth failures "
                f"{fuzzer.auth_failures}, alive after: {alive} ({why})")
    harness.emit(result)
    return 0


def alive_after(fuzzer: Fuzzer) -> tuple[bool, str]:
    """Health SERVING, and the reference session scores as it did before the fuzzing."""
    status = harness.health(fuzzer.address, fuzzer.metadata(), timeout=5.0)
    if status != "SERVING":
        return False, f"health {status}"
    if fuzzer.restarts:
        return False, f"the server was restarted {fuzzer.restarts} time(s)"
    try:
        again = fuzzer.score(fuzzer.reference, fuzzer.reference_z)
    except Exception as error:
        return False, f"the reference session no longer scores: {short(str(error), 200)}"
    finally:
        for session, which in ((fuzzer.reference, 0), (fuzzer.target, 0), (fuzzer.other, 1)):
            if session is not None:
                fuzzer.close_quietly(session.id, which)
    if not all(np.array_equal(a, b) for a, b in zip(fuzzer.reference_scores, again)):
        return False, f"the reference scores changed: {fuzzer.reference_scores[0].tolist()} -> {again[0].tolist()}"
    return True, "health SERVING; the reference session scores the same bits as before"


if __name__ == "__main__":
    sys.exit(main())
