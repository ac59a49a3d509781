from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SchemaVersion(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCHEMA_VERSION_UNSPECIFIED: _ClassVar[SchemaVersion]
    SCHEMA_VERSION_CURRENT: _ClassVar[SchemaVersion]

class ChunkKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CHUNK_KIND_UNSPECIFIED: _ClassVar[ChunkKind]
    CHUNK_FIRST: _ClassVar[ChunkKind]
    CHUNK_PREFILL: _ClassVar[ChunkKind]
    CHUNK_DECODE: _ClassVar[ChunkKind]
    CHUNK_VERIFY: _ClassVar[ChunkKind]

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    INT64: _ClassVar[DType]
    INT32: _ClassVar[DType]
SCHEMA_VERSION_UNSPECIFIED: SchemaVersion
SCHEMA_VERSION_CURRENT: SchemaVersion
CHUNK_KIND_UNSPECIFIED: ChunkKind
CHUNK_FIRST: ChunkKind
CHUNK_PREFILL: ChunkKind
CHUNK_DECODE: ChunkKind
CHUNK_VERIFY: ChunkKind
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
BFLOAT16: DType
FLOAT16: DType
INT64: DType
INT32: DType

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "repetition_penalty", "presence_penalty", "frequency_penalty", "seed", "logprobs")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    seed: int
    logprobs: int
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., repetition_penalty: _Optional[float] = ..., presence_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., seed: _Optional[int] = ..., logprobs: _Optional[int] = ...) -> None: ...

class SequenceChunk(_message.Message):
    __slots__ = ("seq_id", "start_pos", "num_tokens", "new_blocks", "do_sample", "sampling", "num_prompt_tokens", "token_ids", "kind", "score_rows")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    START_POS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NEW_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    DO_SAMPLE_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SCORE_ROWS_FIELD_NUMBER: _ClassVar[int]
    seq_id: int
    start_pos: int
    num_tokens: int
    new_blocks: _containers.RepeatedScalarFieldContainer[int]
    do_sample: bool
    sampling: SamplingParams
    num_prompt_tokens: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    kind: ChunkKind
    score_rows: bool
    def __init__(self, seq_id: _Optional[int] = ..., start_pos: _Optional[int] = ..., num_tokens: _Optional[int] = ..., new_blocks: _Optional[_Iterable[int]] = ..., do_sample: _Optional[bool] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., num_prompt_tokens: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., kind: _Optional[_Union[ChunkKind, str]] = ..., score_rows: _Optional[bool] = ...) -> None: ...

class StageTiming(_message.Message):
    __slots__ = ("stage_index", "received_ns", "compute_start_ns", "compute_end_ns", "prev_send_batch_id", "prev_send_ns", "layers_ns")
    STAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_NS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_START_NS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_END_NS_FIELD_NUMBER: _ClassVar[int]
    PREV_SEND_BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    PREV_SEND_NS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_NS_FIELD_NUMBER: _ClassVar[int]
    stage_index: int
    received_ns: int
    compute_start_ns: int
    compute_end_ns: int
    prev_send_batch_id: int
    prev_send_ns: int
    layers_ns: int
    def __init__(self, stage_index: _Optional[int] = ..., received_ns: _Optional[int] = ..., compute_start_ns: _Optional[int] = ..., compute_end_ns: _Optional[int] = ..., prev_send_batch_id: _Optional[int] = ..., prev_send_ns: _Optional[int] = ..., layers_ns: _Optional[int] = ...) -> None: ...

class MicroBatch(_message.Message):
    __slots__ = ("batch_id", "seqs", "tensor", "drop_seq_ids", "timings", "schema_version")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    SEQS_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    DROP_SEQ_IDS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    batch_id: int
    seqs: _containers.RepeatedCompositeFieldContainer[SequenceChunk]
    tensor: Tensor
    drop_seq_ids: _containers.RepeatedScalarFieldContainer[int]
    timings: _containers.RepeatedCompositeFieldContainer[StageTiming]
    schema_version: SchemaVersion
    def __init__(self, batch_id: _Optional[int] = ..., seqs: _Optional[_Iterable[_Union[SequenceChunk, _Mapping]]] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ..., drop_seq_ids: _Optional[_Iterable[int]] = ..., timings: _Optional[_Iterable[_Union[StageTiming, _Mapping]]] = ..., schema_version: _Optional[_Union[SchemaVersion, str]] = ...) -> None: ...

class LinkFrame(_message.Message):
    __slots__ = ("batch", "chunk", "last")
    BATCH_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    batch: MicroBatch
    chunk: bytes
    last: bool
    def __init__(self, batch: _Optional[_Union[MicroBatch, _Mapping]] = ..., chunk: _Optional[bytes] = ..., last: _Optional[bool] = ...) -> None: ...

class LinkAck(_message.Message):
    __slots__ = ("batch_id", "code", "error")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    batch_id: int
    code: int
    error: str
    def __init__(self, batch_id: _Optional[int] = ..., code: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class TopLogprob(_message.Message):
    __slots__ = ("token_id", "logprob")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[float] = ...) -> None: ...

class Sample(_message.Message):
    __slots__ = ("seq_id", "token_id", "logprob", "top_logprobs")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    seq_id: int
    token_id: int
    logprob: float
    top_logprobs: _containers.RepeatedCompositeFieldContainer[TopLogprob]
    def __init__(self, seq_id: _Optional[int] = ..., token_id: _Optional[int] = ..., logprob: _Optional[float] = ..., top_logprobs: _Optional[_Iterable[_Union[TopLogprob, _Mapping]]] = ...) -> None: ...

class Delivery(_message.Message):
    __slots__ = ("batch_id", "samples", "timings", "error", "error_stage")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ERROR_STAGE_FIELD_NUMBER: _ClassVar[int]
    batch_id: int
    samples: _containers.RepeatedCompositeFieldContainer[Sample]
    timings: _containers.RepeatedCompositeFieldContainer[StageTiming]
    error: str
    error_stage: int
    def __init__(self, batch_id: _Optional[int] = ..., samples: _Optional[_Iterable[_Union[Sample, _Mapping]]] = ..., timings: _Optional[_Iterable[_Union[StageTiming, _Mapping]]] = ..., error: _Optional[str] = ..., error_stage: _Optional[int] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StageInfo(_message.Message):
    __slots__ = ("index", "layer_start", "layer_end", "device", "weight_bytes", "memory_total_bytes", "memory_used_bytes", "num_kv_blocks", "block_size", "address", "pid", "schema_version", "checkpoint_fingerprint", "node_id", "dtype", "kv_block_layer_bytes", "layer_weight_bytes", "weight_formats")
    class WeightFormatsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCK_LAYER_BYTES_FIELD_NUMBER: _ClassVar[int]
    LAYER_WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FORMATS_FIELD_NUMBER: _ClassVar[int]
    index: int
    layer_start: int
    layer_end: int
    device: str
    weight_bytes: int
    memory_total_bytes: int
    memory_used_bytes: int
    num_kv_blocks: int
    block_size: int
    address: str
    pid: int
    schema_version: SchemaVersion
    checkpoint_fingerprint: str
    node_id: str
    dtype: str
    kv_block_layer_bytes: int
    layer_weight_bytes: _containers.RepeatedScalarFieldContainer[int]
    weight_formats: _containers.ScalarMap[str, int]
    def __init__(self, index: _Optional[int] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., device: _Optional[str] = ..., weight_bytes: _Optional[int] = ..., memory_total_bytes: _Optional[int] = ..., memory_used_bytes: _Optional[int] = ..., num_kv_blocks: _Optional[int] = ..., block_size: _Optional[int] = ..., address: _Optional[str] = ..., pid: _Optional[int] = ..., schema_version: _Optional[_Union[SchemaVersion, str]] = ..., checkpoint_fingerprint: _Optional[str] = ..., node_id: _Optional[str] = ..., dtype: _Optional[str] = ..., kv_block_layer_bytes: _Optional[int] = ..., layer_weight_bytes: _Optional[_Iterable[int]] = ..., weight_formats: _Optional[_Mapping[str, int]] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthReply(_message.Message):
    __slots__ = ("serving", "batches_done", "queue_depth", "compute_ns_total", "errors")
    SERVING_FIELD_NUMBER: _ClassVar[int]
    BATCHES_DONE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_NS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    serving: bool
    batches_done: int
    queue_depth: int
    compute_ns_total: int
    errors: int
    def __init__(self, serving: _Optional[bool] = ..., batches_done: _Optional[int] = ..., queue_depth: _Optional[int] = ..., compute_ns_total: _Optional[int] = ..., errors: _Optional[int] = ...) -> None: ...
