from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("data", "shape", "dtype")
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    def __init__(self, data: _Optional[bytes] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_name", "architecture", "hidden_size", "num_layers", "vocab_size", "max_length", "delta_kinds", "projection_kinds", "device", "dtype", "max_batch_tokens", "gradients_enabled", "memory_plan", "delta_forms", "kinds", "cache_report", "logits_enabled", "keyed", "limits")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    DELTA_KINDS_FIELD_NUMBER: _ClassVar[int]
    PROJECTION_KINDS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GRADIENTS_ENABLED_FIELD_NUMBER: _ClassVar[int]
    MEMORY_PLAN_FIELD_NUMBER: _ClassVar[int]
    DELTA_FORMS_FIELD_NUMBER: _ClassVar[int]
    KINDS_FIELD_NUMBER: _ClassVar[int]
    CACHE_REPORT_FIELD_NUMBER: _ClassVar[int]
    LOGITS_ENABLED_FIELD_NUMBER: _ClassVar[int]
    KEYED_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    architecture: str
    hidden_size: int
    num_layers: int
    vocab_size: int
    max_length: int
    delta_kinds: _containers.RepeatedScalarFieldContainer[str]
    projection_kinds: _containers.RepeatedScalarFieldContainer[str]
    device: str
    dtype: str
    max_batch_tokens: int
    gradients_enabled: bool
    memory_plan: str
    delta_forms: _containers.RepeatedScalarFieldContainer[str]
    kinds: _containers.RepeatedCompositeFieldContainer[DeltaKind]
    cache_report: str
    logits_enabled: bool
    keyed: bool
    limits: Limits
    def __init__(self, model_name: _Optional[str] = ..., architecture: _Optional[str] = ..., hidden_size: _Optional[int] = ..., num_layers: _Optional[int] = ..., vocab_size: _Optional[int] = ..., max_length: _Optional[int] = ..., delta_kinds: _Optional[_Iterable[str]] = ..., projection_kinds: _Optional[_Iterable[str]] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., max_batch_tokens: _Optional[int] = ..., gradients_enabled: _Optional[bool] = ..., memory_plan: _Optional[str] = ..., delta_forms: _Optional[_Iterable[str]] = ..., kinds: _Optional[_Iterable[_Union[DeltaKind, _Mapping]]] = ..., cache_report: _Optional[str] = ..., logits_enabled: _Optional[bool] = ..., keyed: _Optional[bool] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_population", "max_rows_per_call", "max_examples_per_session", "max_sessions", "session_ttl_s", "max_delta_bytes")
    MAX_POPULATION_FIELD_NUMBER: _ClassVar[int]
    MAX_ROWS_PER_CALL_FIELD_NUMBER: _ClassVar[int]
    MAX_EXAMPLES_PER_SESSION_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    SESSION_TTL_S_FIELD_NUMBER: _ClassVar[int]
    MAX_DELTA_BYTES_FIELD_NUMBER: _ClassVar[int]
    max_population: int
    max_rows_per_call: int
    max_examples_per_session: int
    max_sessions: int
    session_ttl_s: float
    max_delta_bytes: int
    def __init__(self, max_population: _Optional[int] = ..., max_rows_per_call: _Optional[int] = ..., max_examples_per_session: _Optional[int] = ..., max_sessions: _Optional[int] = ..., session_ttl_s: _Optional[float] = ..., max_delta_bytes: _Optional[int] = ...) -> None: ...

class DeltaKind(_message.Message):
    __slots__ = ("name", "summary", "takes_prompt", "rank_name", "default_rank", "takes_targets", "gated_roles", "peft_type", "per_layer_z", "mixable", "reuses_prefix", "kv_prompt", "note")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    TAKES_PROMPT_FIELD_NUMBER: _ClassVar[int]
    RANK_NAME_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_RANK_FIELD_NUMBER: _ClassVar[int]
    TAKES_TARGETS_FIELD_NUMBER: _ClassVar[int]
    GATED_ROLES_FIELD_NUMBER: _ClassVar[int]
    PEFT_TYPE_FIELD_NUMBER: _ClassVar[int]
    PER_LAYER_Z_FIELD_NUMBER: _ClassVar[int]
    MIXABLE_FIELD_NUMBER: _ClassVar[int]
    REUSES_PREFIX_FIELD_NUMBER: _ClassVar[int]
    KV_PROMPT_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    name: str
    summary: str
    takes_prompt: bool
    rank_name: str
    default_rank: int
    takes_targets: bool
    gated_roles: _containers.RepeatedScalarFieldContainer[str]
    peft_type: str
    per_layer_z: bool
    mixable: bool
    reuses_prefix: bool
    kv_prompt: bool
    note: str
    def __init__(self, name: _Optional[str] = ..., summary: _Optional[str] = ..., takes_prompt: _Optional[bool] = ..., rank_name: _Optional[str] = ..., default_rank: _Optional[int] = ..., takes_targets: _Optional[bool] = ..., gated_roles: _Optional[_Iterable[str]] = ..., peft_type: _Optional[str] = ..., per_layer_z: _Optional[bool] = ..., mixable: _Optional[bool] = ..., reuses_prefix: _Optional[bool] = ..., kv_prompt: _Optional[bool] = ..., note: _Optional[str] = ...) -> None: ...

class Example(_message.Message):
    __slots__ = ("text_a", "text_b", "label")
    TEXT_A_FIELD_NUMBER: _ClassVar[int]
    TEXT_B_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    text_a: str
    text_b: str
    label: int
    def __init__(self, text_a: _Optional[str] = ..., text_b: _Optional[str] = ..., label: _Optional[int] = ...) -> None: ...

class Split(_message.Message):
    __slots__ = ("name", "examples")
    NAME_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    name: str
    examples: _containers.RepeatedCompositeFieldContainer[Example]
    def __init__(self, name: _Optional[str] = ..., examples: _Optional[_Iterable[_Union[Example, _Mapping]]] = ...) -> None: ...

class DeltaSpec(_message.Message):
    __slots__ = ("kind", "prompt_length", "intrinsic_dim", "projection", "seed", "projection_scale", "rank", "targets", "per_layer_z", "part_dims", "init_text", "said")
    KIND_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    INTRINSIC_DIM_FIELD_NUMBER: _ClassVar[int]
    PROJECTION_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    PROJECTION_SCALE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    PER_LAYER_Z_FIELD_NUMBER: _ClassVar[int]
    PART_DIMS_FIELD_NUMBER: _ClassVar[int]
    INIT_TEXT_FIELD_NUMBER: _ClassVar[int]
    SAID_FIELD_NUMBER: _ClassVar[int]
    kind: str
    prompt_length: int
    intrinsic_dim: int
    projection: str
    seed: int
    projection_scale: float
    rank: int
    targets: _containers.RepeatedScalarFieldContainer[str]
    per_layer_z: bool
    part_dims: _containers.RepeatedScalarFieldContainer[int]
    init_text: str
    said: bool
    def __init__(self, kind: _Optional[str] = ..., prompt_length: _Optional[int] = ..., intrinsic_dim: _Optional[int] = ..., projection: _Optional[str] = ..., seed: _Optional[int] = ..., projection_scale: _Optional[float] = ..., rank: _Optional[int] = ..., targets: _Optional[_Iterable[str]] = ..., per_layer_z: _Optional[bool] = ..., part_dims: _Optional[_Iterable[int]] = ..., init_text: _Optional[str] = ..., said: _Optional[bool] = ...) -> None: ...

class ZBlock(_message.Message):
    __slots__ = ("name", "size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    size: int
    def __init__(self, name: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class CreateSessionRequest(_message.Message):
    __slots__ = ("splits", "template", "verbalizer", "delta", "truncate")
    SPLITS_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    VERBALIZER_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    TRUNCATE_FIELD_NUMBER: _ClassVar[int]
    splits: _containers.RepeatedCompositeFieldContainer[Split]
    template: str
    verbalizer: _containers.RepeatedScalarFieldContainer[str]
    delta: DeltaSpec
    truncate: bool
    def __init__(self, splits: _Optional[_Iterable[_Union[Split, _Mapping]]] = ..., template: _Optional[str] = ..., verbalizer: _Optional[_Iterable[str]] = ..., delta: _Optional[_Union[DeltaSpec, _Mapping]] = ..., truncate: _Optional[bool] = ...) -> None: ...

class CreateSessionResponse(_message.Message):
    __slots__ = ("session_id", "verbalizer_token_ids", "split_sizes", "prompt_position", "prefix_reuse", "truncated_examples", "z_dim", "z_blocks", "delta_size")
    class SplitSizesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    VERBALIZER_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SPLIT_SIZES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_POSITION_FIELD_NUMBER: _ClassVar[int]
    PREFIX_REUSE_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    Z_DIM_FIELD_NUMBER: _ClassVar[int]
    Z_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    DELTA_SIZE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    verbalizer_token_ids: _containers.RepeatedScalarFieldContainer[int]
    split_sizes: _containers.ScalarMap[str, int]
    prompt_position: str
    prefix_reuse: bool
    truncated_examples: int
    z_dim: int
    z_blocks: _containers.RepeatedCompositeFieldContainer[ZBlock]
    delta_size: int
    def __init__(self, session_id: _Optional[str] = ..., verbalizer_token_ids: _Optional[_Iterable[int]] = ..., split_sizes: _Optional[_Mapping[str, int]] = ..., prompt_position: _Optional[str] = ..., prefix_reuse: _Optional[bool] = ..., truncated_examples: _Optional[int] = ..., z_dim: _Optional[int] = ..., z_blocks: _Optional[_Iterable[_Union[ZBlock, _Mapping]]] = ..., delta_size: _Optional[int] = ...) -> None: ...

class EvaluateRequest(_message.Message):
    __slots__ = ("session_id", "split", "z", "start", "count", "return_logits")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    Z_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    RETURN_LOGITS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    split: str
    z: Tensor
    start: int
    count: int
    return_logits: bool
    def __init__(self, session_id: _Optional[str] = ..., split: _Optional[str] = ..., z: _Optional[_Union[Tensor, _Mapping]] = ..., start: _Optional[int] = ..., count: _Optional[int] = ..., return_logits: _Optional[bool] = ...) -> None: ...

class EvaluateResponse(_message.Message):
    __slots__ = ("ce_loss", "hinge_loss", "accuracy", "logits", "num_examples", "server_ms")
    CE_LOSS_FIELD_NUMBER: _ClassVar[int]
    HINGE_LOSS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    SERVER_MS_FIELD_NUMBER: _ClassVar[int]
    ce_loss: Tensor
    hinge_loss: Tensor
    accuracy: Tensor
    logits: Tensor
    num_examples: int
    server_ms: float
    def __init__(self, ce_loss: _Optional[_Union[Tensor, _Mapping]] = ..., hinge_loss: _Optional[_Union[Tensor, _Mapping]] = ..., accuracy: _Optional[_Union[Tensor, _Mapping]] = ..., logits: _Optional[_Union[Tensor, _Mapping]] = ..., num_examples: _Optional[int] = ..., server_ms: _Optional[float] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseSessionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GradientRequest(_message.Message):
    __slots__ = ("session_id", "split", "z", "start", "count", "loss")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    Z_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    split: str
    z: Tensor
    start: int
    count: int
    loss: str
    def __init__(self, session_id: _Optional[str] = ..., split: _Optional[str] = ..., z: _Optional[_Union[Tensor, _Mapping]] = ..., start: _Optional[int] = ..., count: _Optional[int] = ..., loss: _Optional[str] = ...) -> None: ...

class GradientResponse(_message.Message):
    __slots__ = ("loss", "accuracy", "grad", "num_examples", "server_ms")
    LOSS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    GRAD_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    SERVER_MS_FIELD_NUMBER: _ClassVar[int]
    loss: Tensor
    accuracy: Tensor
    grad: Tensor
    num_examples: int
    server_ms: float
    def __init__(self, loss: _Optional[_Union[Tensor, _Mapping]] = ..., accuracy: _Optional[_Union[Tensor, _Mapping]] = ..., grad: _Optional[_Union[Tensor, _Mapping]] = ..., num_examples: _Optional[int] = ..., server_ms: _Optional[float] = ...) -> None: ...

class UploadSubspaceRequest(_message.Message):
    __slots__ = ("name", "data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    data: bytes
    def __init__(self, name: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class UploadSubspaceResponse(_message.Message):
    __slots__ = ("projection", "dim", "delta_size")
    PROJECTION_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    DELTA_SIZE_FIELD_NUMBER: _ClassVar[int]
    projection: str
    dim: int
    delta_size: int
    def __init__(self, projection: _Optional[str] = ..., dim: _Optional[int] = ..., delta_size: _Optional[int] = ...) -> None: ...

class UsageRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class UsageResponse(_message.Message):
    __slots__ = ("tenant", "calls_used", "calls_quota", "calls_left", "examples_scored", "sessions_held", "max_sessions", "max_examples")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    CALLS_USED_FIELD_NUMBER: _ClassVar[int]
    CALLS_QUOTA_FIELD_NUMBER: _ClassVar[int]
    CALLS_LEFT_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_SCORED_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_HELD_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    calls_used: int
    calls_quota: int
    calls_left: int
    examples_scored: int
    sessions_held: int
    max_sessions: int
    max_examples: int
    def __init__(self, tenant: _Optional[str] = ..., calls_used: _Optional[int] = ..., calls_quota: _Optional[int] = ..., calls_left: _Optional[int] = ..., examples_scored: _Optional[int] = ..., sessions_held: _Optional[int] = ..., max_sessions: _Optional[int] = ..., max_examples: _Optional[int] = ...) -> None: ...

class StoredDelta(_message.Message):
    __slots__ = ("name", "delta", "template", "verbalizer", "z", "truncate", "label_bias", "model_name", "saved_unix", "notes")
    class NotesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    VERBALIZER_FIELD_NUMBER: _ClassVar[int]
    Z_FIELD_NUMBER: _ClassVar[int]
    TRUNCATE_FIELD_NUMBER: _ClassVar[int]
    LABEL_BIAS_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    SAVED_UNIX_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    delta: DeltaSpec
    template: str
    verbalizer: _containers.RepeatedScalarFieldContainer[str]
    z: Tensor
    truncate: bool
    label_bias: _containers.RepeatedScalarFieldContainer[float]
    model_name: str
    saved_unix: float
    notes: _containers.ScalarMap[str, str]
    def __init__(self, name: _Optional[str] = ..., delta: _Optional[_Union[DeltaSpec, _Mapping]] = ..., template: _Optional[str] = ..., verbalizer: _Optional[_Iterable[str]] = ..., z: _Optional[_Union[Tensor, _Mapping]] = ..., truncate: _Optional[bool] = ..., label_bias: _Optional[_Iterable[float]] = ..., model_name: _Optional[str] = ..., saved_unix: _Optional[float] = ..., notes: _Optional[_Mapping[str, str]] = ...) -> None: ...

class SaveDeltaRequest(_message.Message):
    __slots__ = ("delta", "overwrite")
    DELTA_FIELD_NUMBER: _ClassVar[int]
    OVERWRITE_FIELD_NUMBER: _ClassVar[int]
    delta: StoredDelta
    overwrite: bool
    def __init__(self, delta: _Optional[_Union[StoredDelta, _Mapping]] = ..., overwrite: _Optional[bool] = ...) -> None: ...

class SaveDeltaResponse(_message.Message):
    __slots__ = ("name", "z_dim")
    NAME_FIELD_NUMBER: _ClassVar[int]
    Z_DIM_FIELD_NUMBER: _ClassVar[int]
    name: str
    z_dim: int
    def __init__(self, name: _Optional[str] = ..., z_dim: _Optional[int] = ...) -> None: ...

class ListDeltasRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListDeltasResponse(_message.Message):
    __slots__ = ("deltas",)
    DELTAS_FIELD_NUMBER: _ClassVar[int]
    deltas: _containers.RepeatedCompositeFieldContainer[StoredDelta]
    def __init__(self, deltas: _Optional[_Iterable[_Union[StoredDelta, _Mapping]]] = ...) -> None: ...

class DeleteDeltaRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteDeltaResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("delta_name", "delta", "texts")
    DELTA_NAME_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    delta_name: str
    delta: StoredDelta
    texts: _containers.RepeatedCompositeFieldContainer[Example]
    def __init__(self, delta_name: _Optional[str] = ..., delta: _Optional[_Union[StoredDelta, _Mapping]] = ..., texts: _Optional[_Iterable[_Union[Example, _Mapping]]] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("labels", "probabilities", "label_words")
    LABELS_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    LABEL_WORDS_FIELD_NUMBER: _ClassVar[int]
    labels: _containers.RepeatedScalarFieldContainer[int]
    probabilities: Tensor
    label_words: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, labels: _Optional[_Iterable[int]] = ..., probabilities: _Optional[_Union[Tensor, _Mapping]] = ..., label_words: _Optional[_Iterable[str]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("delta_name", "delta", "texts", "max_new_tokens", "temperature", "seed", "stop")
    DELTA_NAME_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    delta_name: str
    delta: StoredDelta
    texts: _containers.RepeatedCompositeFieldContainer[Example]
    max_new_tokens: int
    temperature: float
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, delta_name: _Optional[str] = ..., delta: _Optional[_Union[StoredDelta, _Mapping]] = ..., texts: _Optional[_Iterable[_Union[Example, _Mapping]]] = ..., max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ...) -> None: ...

class Generation(_message.Message):
    __slots__ = ("text", "tokens", "finish_reason")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    text: str
    tokens: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: str
    def __init__(self, text: _Optional[str] = ..., tokens: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[str] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("generations",)
    GENERATIONS_FIELD_NUMBER: _ClassVar[int]
    generations: _containers.RepeatedCompositeFieldContainer[Generation]
    def __init__(self, generations: _Optional[_Iterable[_Union[Generation, _Mapping]]] = ...) -> None: ...
