"""Typed errors raised at Stagecoach's boundaries, and the one table that maps each to an HTTP, gRPC and CLI status."""

from __future__ import annotations

from dataclasses import dataclass


class StagecoachError(Exception):
    """Base of every error a user can cause and fix; its message says what to change."""


class ConfigError(StagecoachError):
    """A configuration, config.json or command-line value is invalid."""


class CheckpointError(StagecoachError):
    """A checkpoint folder is missing files or tensors, or a tensor has the wrong shape."""


class PartitionError(StagecoachError):
    """A layer split cannot be built (wrong sum, more stages than layers, …)."""


class DownloadError(StagecoachError):
    """A downloaded part is missing or has other bytes than the pinned ones."""


class RequestError(StagecoachError):
    """A request is invalid: prompt too long, bad sampling parameter, unknown token id.

    `param` names the request parameter at fault (OpenAI's `error.param`), when there is one.
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ContextLengthError(RequestError):
    """Prompt plus requested tokens do not fit the model's context (or the KV cache)."""


class ModelNotFoundError(RequestError):
    """The request names a model this server does not serve."""


class UnsupportedMediaTypeError(RequestError):
    """The request body is not JSON."""


class WireError(RequestError):
    """A message is malformed: unknown dtype, a shape that disagrees with its bytes, a bad field."""


class KVCacheError(StagecoachError):
    """A slot or block index lies outside a stage's cache, or a cache cannot be built."""


class StaleBatchError(StagecoachError):
    """A microbatch from before a recovery reached a stage that has been fenced off from it."""


class AuthenticationError(StagecoachError):
    """A missing or wrong API key."""


class ForbiddenError(StagecoachError):
    """The endpoint is closed on this server (an admin endpoint without an API key)."""


class QueueFullError(StagecoachError):
    """The server already holds as many requests as it admits."""


class NotReadyError(StagecoachError):
    """The pipeline is starting, recovering or has failed: try again later."""


class ShuttingDownError(StagecoachError):
    """The server is draining and takes no new work."""


class RequestTimeoutError(StagecoachError):
    """A request took longer than the server's request timeout."""


class PipelineError(StagecoachError):
    """A stage failed a microbatch or cannot be reached."""


class StageComputeError(StagecoachError):
    """A stage failed a request's microbatches again after a retry on its own, while the stage stayed up: the request ends, others go on."""


class ConflictError(StagecoachError):
    """The call cannot run now: a recovery or another rebalance is under way."""


class EngineFailure(StagecoachError):
    """The engine loop died on an unexpected error; the requests it held cannot finish."""


@dataclass(frozen=True, slots=True)
class ErrorKind:
    """How one error type reaches each kind of caller."""

    http_status: int
    openai_type: str  # OpenAI's error.type
    openai_code: str  # OpenAI's error.code
    grpc_status: str  # the name of a grpc.StatusCode
    exit_code: int  # the CLI's
    retry_after_s: int | None = None  # HTTP Retry-After, for errors that pass


_CLIENT = "invalid_request_error"
_SERVER = "server_error"

# The one table. A type not listed takes its nearest listed base class's row; anything that is not
# a StagecoachError is a bug of ours (the Exception row).
ERROR_TABLE: dict[type[BaseException], ErrorKind] = {
    Exception: ErrorKind(500, _SERVER, "internal_error", "INTERNAL", 1),
    StagecoachError: ErrorKind(500, _SERVER, "internal_error", "INVALID_ARGUMENT", 2),
    ConfigError: ErrorKind(500, _SERVER, "config_error", "FAILED_PRECONDITION", 2),
    CheckpointError: ErrorKind(500, _SERVER, "checkpoint_error", "FAILED_PRECONDITION", 2),
    PartitionError: ErrorKind(500, _SERVER, "config_error", "FAILED_PRECONDITION", 2),
    DownloadError: ErrorKind(500, _SERVER, "download_error", "UNAVAILABLE", 2),
    RequestError: ErrorKind(400, _CLIENT, "invalid_parameter", "INVALID_ARGUMENT", 2),
    ContextLengthError: ErrorKind(400, _CLIENT, "context_length_exceeded", "INVALID_ARGUMENT", 2),
    ModelNotFoundError: ErrorKind(404, _CLIENT, "model_not_found", "NOT_FOUND", 2),
    UnsupportedMediaTypeError: ErrorKind(415, _CLIENT, "unsupported_media_type", "INVALID_ARGUMENT", 2),
    WireError: ErrorKind(400, _CLIENT, "invalid_message", "INVALID_ARGUMENT", 2),
    KVCacheError: ErrorKind(400, _CLIENT, "invalid_kv_address", "INVALID_ARGUMENT", 2),
    StaleBatchError: ErrorKind(409, _CLIENT, "stale_microbatch", "FAILED_PRECONDITION", 1),
    AuthenticationError: ErrorKind(401, "authentication_error", "invalid_api_key", "UNAUTHENTICATED", 2),
    ForbiddenError: ErrorKind(403, "permission_error", "forbidden", "PERMISSION_DENIED", 2),
    QueueFullError: ErrorKind(429, "rate_limit_exceeded", "queue_full", "RESOURCE_EXHAUSTED", 1, retry_after_s=1),
    NotReadyError: ErrorKind(503, _SERVER, "not_ready", "UNAVAILABLE", 1, retry_after_s=5),
    ShuttingDownError: ErrorKind(503, _SERVER, "shutting_down", "UNAVAILABLE", 1),
    RequestTimeoutError: ErrorKind(408, _CLIENT, "request_timeout", "DEADLINE_EXCEEDED", 1),
    PipelineError: ErrorKind(503, _SERVER, "pipeline_failed", "UNAVAILABLE", 1, retry_after_s=5),
    StageComputeError: ErrorKind(500, _SERVER, "stage_error", "INTERNAL", 1),
    EngineFailure: ErrorKind(500, _SERVER, "engine_failed", "INTERNAL", 1),
    ConflictError: ErrorKind(409, _CLIENT, "conflict", "FAILED_PRECONDITION", 1, retry_after_s=5),
}


def error_kind(error: BaseException) -> ErrorKind:
    """The table's row for this error: its own type's, else its nearest listed base class's."""
    for cls in type(error).__mro__:
        if cls in ERROR_TABLE:
            return ERROR_TABLE[cls]
    return ERROR_TABLE[Exception]
