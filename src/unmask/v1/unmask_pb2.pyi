from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Modality(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODALITY_UNSPECIFIED: _ClassVar[Modality]
    MODALITY_TEXT: _ClassVar[Modality]
    MODALITY_CODE: _ClassVar[Modality]
    MODALITY_MIDI: _ClassVar[Modality]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_EOS: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_MAX_STEPS: _ClassVar[FinishReason]

class BatchStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BATCH_STATUS_UNSPECIFIED: _ClassVar[BatchStatus]
    BATCH_STATUS_RUNNING: _ClassVar[BatchStatus]
    BATCH_STATUS_CANCELLING: _ClassVar[BatchStatus]
    BATCH_STATUS_COMPLETED: _ClassVar[BatchStatus]
    BATCH_STATUS_CANCELLED: _ClassVar[BatchStatus]
MODALITY_UNSPECIFIED: Modality
MODALITY_TEXT: Modality
MODALITY_CODE: Modality
MODALITY_MIDI: Modality
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_EOS: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_MAX_STEPS: FinishReason
BATCH_STATUS_UNSPECIFIED: BatchStatus
BATCH_STATUS_RUNNING: BatchStatus
BATCH_STATUS_CANCELLING: BatchStatus
BATCH_STATUS_COMPLETED: BatchStatus
BATCH_STATUS_CANCELLED: BatchStatus

class SamplerParams(_message.Message):
    __slots__ = ("gen_length", "steps", "block_length", "threshold", "position_score", "temperature", "top_k", "top_p", "remask_budget", "remask_threshold", "cache", "max_steps", "seed", "stop_at_eos", "grammar", "speculative")
    GEN_LENGTH_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_LENGTH_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    POSITION_SCORE_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    REMASK_BUDGET_FIELD_NUMBER: _ClassVar[int]
    REMASK_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_AT_EOS_FIELD_NUMBER: _ClassVar[int]
    GRAMMAR_FIELD_NUMBER: _ClassVar[int]
    SPECULATIVE_FIELD_NUMBER: _ClassVar[int]
    gen_length: int
    steps: int
    block_length: int
    threshold: float
    position_score: str
    temperature: float
    top_k: int
    top_p: float
    remask_budget: int
    remask_threshold: float
    cache: str
    max_steps: int
    seed: int
    stop_at_eos: bool
    grammar: bool
    speculative: bool
    def __init__(self, gen_length: _Optional[int] = ..., steps: _Optional[int] = ..., block_length: _Optional[int] = ..., threshold: _Optional[float] = ..., position_score: _Optional[str] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., remask_budget: _Optional[int] = ..., remask_threshold: _Optional[float] = ..., cache: _Optional[str] = ..., max_steps: _Optional[int] = ..., seed: _Optional[int] = ..., stop_at_eos: _Optional[bool] = ..., grammar: _Optional[bool] = ..., speculative: _Optional[bool] = ...) -> None: ...

class Segment(_message.Message):
    __slots__ = ("text", "mask")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    text: str
    mask: int
    def __init__(self, text: _Optional[str] = ..., mask: _Optional[int] = ...) -> None: ...

class Infill(_message.Message):
    __slots__ = ("segments",)
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    segments: _containers.RepeatedCompositeFieldContainer[Segment]
    def __init__(self, segments: _Optional[_Iterable[_Union[Segment, _Mapping]]] = ...) -> None: ...

class MidiInfill(_message.Message):
    __slots__ = ("midi", "bars", "tracks")
    MIDI_FIELD_NUMBER: _ClassVar[int]
    BARS_FIELD_NUMBER: _ClassVar[int]
    TRACKS_FIELD_NUMBER: _ClassVar[int]
    midi: bytes
    bars: _containers.RepeatedScalarFieldContainer[int]
    tracks: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, midi: _Optional[bytes] = ..., bars: _Optional[_Iterable[int]] = ..., tracks: _Optional[_Iterable[int]] = ...) -> None: ...

class MidiSettings(_message.Message):
    __slots__ = ("time_signature", "tempo", "programs", "voices", "bars")
    TIME_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    TEMPO_FIELD_NUMBER: _ClassVar[int]
    PROGRAMS_FIELD_NUMBER: _ClassVar[int]
    VOICES_FIELD_NUMBER: _ClassVar[int]
    BARS_FIELD_NUMBER: _ClassVar[int]
    time_signature: str
    tempo: float
    programs: _containers.RepeatedScalarFieldContainer[int]
    voices: int
    bars: int
    def __init__(self, time_signature: _Optional[str] = ..., tempo: _Optional[float] = ..., programs: _Optional[_Iterable[int]] = ..., voices: _Optional[int] = ..., bars: _Optional[int] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class Chat(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("model", "modality", "prompt", "midi", "infill", "midi_infill", "midi_settings", "chat", "params", "stop", "n", "return_tokens")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MIDI_FIELD_NUMBER: _ClassVar[int]
    INFILL_FIELD_NUMBER: _ClassVar[int]
    MIDI_INFILL_FIELD_NUMBER: _ClassVar[int]
    MIDI_SETTINGS_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    RETURN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    model: str
    modality: Modality
    prompt: str
    midi: bytes
    infill: Infill
    midi_infill: MidiInfill
    midi_settings: MidiSettings
    chat: Chat
    params: SamplerParams
    stop: _containers.RepeatedScalarFieldContainer[str]
    n: int
    return_tokens: bool
    def __init__(self, model: _Optional[str] = ..., modality: _Optional[_Union[Modality, str]] = ..., prompt: _Optional[str] = ..., midi: _Optional[bytes] = ..., infill: _Optional[_Union[Infill, _Mapping]] = ..., midi_infill: _Optional[_Union[MidiInfill, _Mapping]] = ..., midi_settings: _Optional[_Union[MidiSettings, _Mapping]] = ..., chat: _Optional[_Union[Chat, _Mapping]] = ..., params: _Optional[_Union[SamplerParams, _Mapping]] = ..., stop: _Optional[_Iterable[str]] = ..., n: _Optional[int] = ..., return_tokens: _Optional[bool] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "generated_tokens", "nfe", "steps", "tokens_per_forward", "latency_s", "finish_reason", "reason")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NFE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_FORWARD_FIELD_NUMBER: _ClassVar[int]
    LATENCY_S_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    generated_tokens: int
    nfe: int
    steps: int
    tokens_per_forward: float
    latency_s: float
    finish_reason: str
    reason: FinishReason
    def __init__(self, prompt_tokens: _Optional[int] = ..., generated_tokens: _Optional[int] = ..., nfe: _Optional[int] = ..., steps: _Optional[int] = ..., tokens_per_forward: _Optional[float] = ..., latency_s: _Optional[float] = ..., finish_reason: _Optional[str] = ..., reason: _Optional[_Union[FinishReason, str]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("job_id", "modality", "text", "midi", "usage", "params", "tokens", "samples")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    MIDI_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    modality: Modality
    text: str
    midi: bytes
    usage: Usage
    params: SamplerParams
    tokens: _containers.RepeatedCompositeFieldContainer[Token]
    samples: _containers.RepeatedCompositeFieldContainer[GenerateResponse]
    def __init__(self, job_id: _Optional[str] = ..., modality: _Optional[_Union[Modality, str]] = ..., text: _Optional[str] = ..., midi: _Optional[bytes] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., params: _Optional[_Union[SamplerParams, _Mapping]] = ..., tokens: _Optional[_Iterable[_Union[Token, _Mapping]]] = ..., samples: _Optional[_Iterable[_Union[GenerateResponse, _Mapping]]] = ...) -> None: ...

class Token(_message.Message):
    __slots__ = ("position", "id", "confidence")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    position: int
    id: int
    confidence: float
    def __init__(self, position: _Optional[int] = ..., id: _Optional[int] = ..., confidence: _Optional[float] = ...) -> None: ...

class GenerateEvent(_message.Message):
    __slots__ = ("accepted", "step", "block", "final")
    class Accepted(_message.Message):
        __slots__ = ("job_id",)
        JOB_ID_FIELD_NUMBER: _ClassVar[int]
        job_id: str
        def __init__(self, job_id: _Optional[str] = ...) -> None: ...
    class Step(_message.Message):
        __slots__ = ("step", "block", "committed", "tentative", "remasked")
        STEP_FIELD_NUMBER: _ClassVar[int]
        BLOCK_FIELD_NUMBER: _ClassVar[int]
        COMMITTED_FIELD_NUMBER: _ClassVar[int]
        TENTATIVE_FIELD_NUMBER: _ClassVar[int]
        REMASKED_FIELD_NUMBER: _ClassVar[int]
        step: int
        block: int
        committed: _containers.RepeatedCompositeFieldContainer[Token]
        tentative: _containers.RepeatedCompositeFieldContainer[Token]
        remasked: _containers.RepeatedScalarFieldContainer[int]
        def __init__(self, step: _Optional[int] = ..., block: _Optional[int] = ..., committed: _Optional[_Iterable[_Union[Token, _Mapping]]] = ..., tentative: _Optional[_Iterable[_Union[Token, _Mapping]]] = ..., remasked: _Optional[_Iterable[int]] = ...) -> None: ...
    class Block(_message.Message):
        __slots__ = ("index", "text", "ids")
        INDEX_FIELD_NUMBER: _ClassVar[int]
        TEXT_FIELD_NUMBER: _ClassVar[int]
        IDS_FIELD_NUMBER: _ClassVar[int]
        index: int
        text: str
        ids: _containers.RepeatedScalarFieldContainer[int]
        def __init__(self, index: _Optional[int] = ..., text: _Optional[str] = ..., ids: _Optional[_Iterable[int]] = ...) -> None: ...
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    accepted: GenerateEvent.Accepted
    step: GenerateEvent.Step
    block: GenerateEvent.Block
    final: GenerateResponse
    def __init__(self, accepted: _Optional[_Union[GenerateEvent.Accepted, _Mapping]] = ..., step: _Optional[_Union[GenerateEvent.Step, _Mapping]] = ..., block: _Optional[_Union[GenerateEvent.Block, _Mapping]] = ..., final: _Optional[_Union[GenerateResponse, _Mapping]] = ...) -> None: ...

class BatchItem(_message.Message):
    __slots__ = ("custom_id", "request")
    CUSTOM_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    custom_id: str
    request: GenerateRequest
    def __init__(self, custom_id: _Optional[str] = ..., request: _Optional[_Union[GenerateRequest, _Mapping]] = ...) -> None: ...

class SubmitBatchRequest(_message.Message):
    __slots__ = ("items", "idempotency_key", "model")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[BatchItem]
    idempotency_key: str
    model: str
    def __init__(self, items: _Optional[_Iterable[_Union[BatchItem, _Mapping]]] = ..., idempotency_key: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class BatchCounts(_message.Message):
    __slots__ = ("total", "succeeded", "failed", "cancelled", "pending")
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    SUCCEEDED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    total: int
    succeeded: int
    failed: int
    cancelled: int
    pending: int
    def __init__(self, total: _Optional[int] = ..., succeeded: _Optional[int] = ..., failed: _Optional[int] = ..., cancelled: _Optional[int] = ..., pending: _Optional[int] = ...) -> None: ...

class BatchJob(_message.Message):
    __slots__ = ("id", "status", "counts", "model", "idempotency_key", "created_at", "finished_at", "note")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    id: str
    status: BatchStatus
    counts: BatchCounts
    model: str
    idempotency_key: str
    created_at: float
    finished_at: float
    note: str
    def __init__(self, id: _Optional[str] = ..., status: _Optional[_Union[BatchStatus, str]] = ..., counts: _Optional[_Union[BatchCounts, _Mapping]] = ..., model: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., created_at: _Optional[float] = ..., finished_at: _Optional[float] = ..., note: _Optional[str] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[BatchJob]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[BatchJob, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class StreamJobResultsRequest(_message.Message):
    __slots__ = ("id", "follow", "offset")
    ID_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    id: str
    follow: bool
    offset: int
    def __init__(self, id: _Optional[str] = ..., follow: _Optional[bool] = ..., offset: _Optional[int] = ...) -> None: ...

class ItemError(_message.Message):
    __slots__ = ("code", "type", "field", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: str
    type: str
    field: str
    message: str
    def __init__(self, code: _Optional[str] = ..., type: _Optional[str] = ..., field: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class BatchItemResult(_message.Message):
    __slots__ = ("custom_id", "status", "response", "error")
    CUSTOM_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    custom_id: str
    status: str
    response: GenerateResponse
    error: ItemError
    def __init__(self, custom_id: _Optional[str] = ..., status: _Optional[str] = ..., response: _Optional[_Union[GenerateResponse, _Mapping]] = ..., error: _Optional[_Union[ItemError, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[Model]
    def __init__(self, models: _Optional[_Iterable[_Union[Model, _Mapping]]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class Model(_message.Message):
    __slots__ = ("name", "ready", "dispatcher", "live_workers", "queue_length", "max_seq_len", "architecture", "modalities", "family", "parameters", "dtype", "mask_id", "attention", "block_size", "content_hash")
    NAME_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    DISPATCHER_FIELD_NUMBER: _ClassVar[int]
    LIVE_WORKERS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    MODALITIES_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    MASK_ID_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    name: str
    ready: bool
    dispatcher: str
    live_workers: int
    queue_length: int
    max_seq_len: int
    architecture: str
    modalities: _containers.RepeatedScalarFieldContainer[Modality]
    family: str
    parameters: int
    dtype: str
    mask_id: int
    attention: str
    block_size: int
    content_hash: str
    def __init__(self, name: _Optional[str] = ..., ready: _Optional[bool] = ..., dispatcher: _Optional[str] = ..., live_workers: _Optional[int] = ..., queue_length: _Optional[int] = ..., max_seq_len: _Optional[int] = ..., architecture: _Optional[str] = ..., modalities: _Optional[_Iterable[_Union[Modality, str]]] = ..., family: _Optional[str] = ..., parameters: _Optional[int] = ..., dtype: _Optional[str] = ..., mask_id: _Optional[int] = ..., attention: _Optional[str] = ..., block_size: _Optional[int] = ..., content_hash: _Optional[str] = ...) -> None: ...
