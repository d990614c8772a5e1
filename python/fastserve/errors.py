"""The fastserve exception tree.

Core modules raise these with structured arguments; only the HTTP layer maps them to
status codes (one table, in ``fastserve.http.errors``).
"""

from __future__ import annotations


class FastServeError(Exception):
    """Root of every error fastserve raises on purpose."""


class InvalidRequest(FastServeError):
    """The request is malformed or does not match the model (HTTP 400)."""


class ClientDisconnected(InvalidRequest):
    """The client hung up before its whole body arrived (nobody is left to answer)."""

    def __init__(self) -> None:
        super().__init__("client closed the connection before sending its whole body")


class ModelNotFound(FastServeError):
    """No such model, or no such version of it (HTTP 404)."""

    def __init__(self, name: str, version: str | None = None) -> None:
        self.name = name
        self.version = version
        what = f"model '{name}'" if version is None else f"version '{version}' of model '{name}'"
        super().__init__(f"unknown {what}")


class RecordNotFound(FastServeError):
    """No such record: a request id without a prediction, a review item (HTTP 404)."""


class SchemaViolation(InvalidRequest):
    """Input values fail the model's schema (HTTP 400); ``failures`` says which, bounded."""

    def __init__(self, model: str, failures: list[dict[str, object]]) -> None:
        self.failures = failures
        named = ", ".join(f"{f['feature']} ({f['check']})" for f in failures[:5])
        more = f" and {len(failures) - 5} more" if len(failures) > 5 else ""
        super().__init__(f"model '{model}': input values fail its schema: {named}{more}")


class ModelNotReady(FastServeError):
    """The model exists but cannot serve right now (HTTP 503)."""

    def __init__(self, name: str, version: str | None = None, why: str = "not ready") -> None:
        self.name = name
        self.version = version
        label = name if version is None else f"{name}:{version}"
        super().__init__(f"model '{label}' is {why}")


class UnsupportedMediaType(FastServeError):
    """Unsupported Content-Type or Content-Encoding (HTTP 415)."""


class PayloadTooLarge(FastServeError):
    """The body, or its decompressed form, is over the limit (HTTP 413)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(f"request body larger than the limit of {limit} bytes")


class RequestTimeout(FastServeError):
    """The client did not send its body within the body timeout (HTTP 408)."""


class Unavailable(FastServeError):
    """Temporarily unable to take the request (HTTP 503 with Retry-After)."""

    retry_after_s: float = 1.0


class Overloaded(Unavailable):
    """The model's queue is full: shed load at once."""

    def __init__(self, model: str, retry_after_s: float = 1.0) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(f"model '{model}' is overloaded: queue full, retry later")


class QueueTimeout(Unavailable):
    """The request's deadline passed while it waited in the queue; it was never run."""

    def __init__(self, model: str) -> None:
        super().__init__(f"request to model '{model}' timed out in the queue and was not run")


class StoreBusy(Unavailable):
    """The state file stayed locked by another connection (a sibling worker's long write,
    a process stopped while it held the lock) past the store's busy timeout."""


class ServerStopping(Unavailable):
    """The server or model is draining and takes no new work."""

    def __init__(self, what: str = "server") -> None:
        super().__init__(f"{what} is shutting down and takes no new requests")


class InferenceFailed(FastServeError):
    """The backend failed to run a batch (HTTP 500: a model or server bug)."""


class ConfigError(FastServeError):
    """A configuration file is invalid. The message names the file and the field or line."""

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class ChangeRefused(FastServeError):
    """An edit of what serves a model was not applied; the model serves as before (HTTP 400)."""

    def __init__(self, name: str, problem: str) -> None:
        self.name = name
        self.problem = problem
        super().__init__(f"model '{name}': change not applied: {problem}")


class GateFailed(FastServeError):
    """A promotion's gate did not pass (HTTP 409); ``conditions`` says which failed."""

    def __init__(self, name: str, conditions: list[dict[str, object]]) -> None:
        self.conditions = conditions
        failed = ", ".join(str(c["name"]) for c in conditions if not c["passed"])
        super().__init__(f"model '{name}': the promotion gate did not pass ({failed})")


class Unauthorized(FastServeError):
    """No usable credentials for an admin route (HTTP 401)."""


class Forbidden(FastServeError):
    """Credentials given but not accepted, or the admin API is off (HTTP 403)."""


class ModelLoadError(FastServeError):
    """A model version could not be loaded."""

    def __init__(self, name: str, version: str, problem: str) -> None:
        self.name = name
        self.version = version
        self.problem = problem
        super().__init__(f"cannot load model '{name}' version {version}: {problem}")
