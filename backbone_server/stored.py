"""Tuned deltas a tenant keeps on the server, and using them without the model's weights:
SaveDelta, ListDeltas, DeleteDelta, Predict, Generate.

A stored delta is a `StoredDelta` message (a z, its DeltaSpec, template, verbalizer,
label bias), kept in the server's SQLite store by (tenant, name): another tenant's name
answers NOT_FOUND, as a missing one does. Using one builds a transient session of the
texts (`Engine.transient_session`), so Predict scores exactly as Evaluate does.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Callable

import numpy as np

from backbone_server.deltas import DeltaConfig
from backbone_server.engine import Engine
from backbone_server.errors import InvalidArgument, ResourceExhausted, shown
from backbone_server.generation import MAX_TEXTS, Generation
from backbone_server.tenants import Tenant
from blackbox.v1 import backbone_pb2 as pb
from blackbox.v1.verbalizer import label_words
from blackbox.v1.wire import WireError, tensor_to_array

MAX_DELTAS_PER_TENANT = 1000
MAX_RECORD_BYTES = 4 * 2**20  # a stored delta: a z and a few strings
MAX_TEXTS_PER_CALL = 4096  # Predict takes texts in slices of at most this many
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
PREDICT_SPLIT = "predict"


class DeltaLibrary:
    def __init__(self, engine: Engine):
        self.engine = engine

    # ---- keeping -----------------------------------------------------------------------

    def save(self, tenant: Tenant, record: pb.StoredDelta, overwrite: bool,
             cancelled: Callable[[], bool] | None = None) -> pb.StoredDelta:
        """Checks the delta on this server's model (it builds, z fits it), then stores it."""
        if not _NAME.match(record.name):
            raise InvalidArgument(f"a delta name is 1 to 64 letters, digits, '_', '-' or '.', got {shown(record.name)}")
        if record.ByteSize() > MAX_RECORD_BYTES:
            raise ResourceExhausted(f"the delta's record has {record.ByteSize()} bytes, over the bound of "
                                    f"{MAX_RECORD_BYTES}")
        stored = pb.StoredDelta()
        stored.CopyFrom(record)
        stored.model_name = _model_name(self.engine)
        stored.saved_unix = time.time()
        session = self._session(tenant, stored, [("", "")], cancelled)  # refuses what this model cannot use
        _z(stored, session.delta.z_dim)
        self.engine.store.save_delta(tenant.name, stored.name, stored.SerializeToString(), stored.saved_unix,
                                     overwrite, MAX_DELTAS_PER_TENANT)
        return stored

    def load(self, tenant: Tenant, name: str) -> pb.StoredDelta:
        return pb.StoredDelta.FromString(self.engine.store.load_delta(tenant.name, name))

    def list(self, tenant: Tenant) -> list[pb.StoredDelta]:
        """The tenant's deltas without their z (each says its z's shape)."""
        listed = []
        for record in self.engine.store.list_deltas(tenant.name):
            delta = pb.StoredDelta.FromString(record)
            delta.z.data = b""
            listed.append(delta)
        return listed

    def delete(self, tenant: Tenant, name: str) -> None:
        self.engine.store.delete_delta(tenant.name, name)

    def resolve(self, tenant: Tenant, name: str, given: pb.StoredDelta | None) -> pb.StoredDelta:
        """The delta a Predict or Generate names (stored) or carries (given whole)."""
        if name:
            return self.load(tenant, name)
        if given is None or not given.HasField("delta"):
            raise InvalidArgument("name a stored delta (delta_name) or give one whole (delta)")
        return given

    # ---- using -------------------------------------------------------------------------

    def predict(self, tenant: Tenant, record: pb.StoredDelta, texts: list[tuple[str, str]],
                cancelled: Callable[[], bool] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(N,) labels and (N, C) class probabilities of the texts: one API call."""
        _check_texts(texts, MAX_TEXTS_PER_CALL)
        session = self._session(tenant, record, texts, cancelled)
        scores = self.engine.score_transient(session, PREDICT_SPLIT, _z(record, session.delta.z_dim)[None],
                                             tenant, cancelled)
        logits = scores.logits[0].astype(np.float64)  # (N, C)
        if len(record.label_bias):
            if len(record.label_bias) != logits.shape[1]:
                raise InvalidArgument(f"label_bias has {len(record.label_bias)} entries for {logits.shape[1]} classes")
            logits = logits + np.asarray(record.label_bias, np.float64)[None, :]
        logits -= logits.max(axis=1, keepdims=True)
        probabilities = np.exp(logits)
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        return probabilities.argmax(axis=1), probabilities.astype(np.float32)

    def generate(self, tenant: Tenant, record: pb.StoredDelta, texts: list[tuple[str, str]], max_new_tokens: int,
                 temperature: float, seed: int, stop: list[str], cancelled: Callable[[], bool] | None = None):
        """Each text's continuation at {mask} under the delta, one token of all the texts
        per turn at the model (merged with other requests' tokens where the scheduler's
        window is open): one API call per text."""
        _check_texts(texts, MAX_TEXTS)
        session = self._session(tenant, record, texts, cancelled)
        engine = self.engine
        generation = Generation(engine.backbone, session.delta, session.encoder, _z(record, session.delta.z_dim),
                                texts, max_new_tokens, temperature, seed, stop)
        with engine.metered(tenant, len(texts), len(texts) * max_new_tokens):
            return engine.run_generation(generation, tenant, cancelled)

    def _session(self, tenant: Tenant, record: pb.StoredDelta, texts: list[tuple[str, str]],
                 cancelled: Callable[[], bool] | None):
        if record.model_name and record.model_name != _model_name(self.engine):
            raise InvalidArgument(f"the delta was saved on {shown(record.model_name)}; this server hosts "
                                  f"{_model_name(self.engine)}")
        if not record.verbalizer:
            raise InvalidArgument("the delta has no verbalizer: one word (or 'a|b' words) per class")
        return self.engine.transient_session({PREDICT_SPLIT: [(a, b, 0) for a, b in texts]}, record.template,
                                             list(record.verbalizer), DeltaConfig.from_message(record.delta),
                                             record.truncate, tenant, cancelled)


def _model_name(engine: Engine) -> str:
    """The model as a tenant sees it: a model folder's or file's name, never its path."""
    return Path(engine.backbone.name).name


def _z(record: pb.StoredDelta, dim: int) -> np.ndarray:
    try:
        z = tensor_to_array(record.z, ndim=1)
    except WireError as error:
        raise InvalidArgument(f"z: {error}") from None
    if z.shape != (dim,) or not np.isfinite(z).all():
        raise InvalidArgument(f"z must be {dim} finite numbers (the delta's z_dim), got shape {z.shape}")
    return z


def _check_texts(texts: list[tuple[str, str]], bound: int) -> None:
    if not texts:
        raise InvalidArgument("give at least one text")
    if len(texts) > bound:
        raise ResourceExhausted(f"{len(texts)} texts in one call, over this server's bound of {bound}; send them "
                                "in slices")


def answers(verbalizer) -> list[str]:
    """The first word of each class's entry: the class's answer."""
    return [label_words(entry)[0].strip() for entry in verbalizer]

