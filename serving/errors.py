"""One exception hierarchy for the ranking path; the servicer maps it to status codes in one place."""
from __future__ import annotations

import grpc


class ServingError(Exception):
    """Base: carries the gRPC status code it maps to."""

    code = grpc.StatusCode.INTERNAL


class InvalidInput(ServingError):
    """Bad request content; the message starts with the offending field."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field


class TooLarge(InvalidInput):
    """A request beyond a configured size limit."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class NotReady(ServingError):
    """No model is loaded (yet), the server is shutting down, or the event log cannot take a batch."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServingError):
    """Too little of the client's deadline is left to finish the next stage."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(ServingError):
    """The client went away before the answer was ready."""

    code = grpc.StatusCode.CANCELLED


class Overloaded(ServingError):
    """The call waited longer for a handler thread than the server lets a call queue."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unauthenticated(ServingError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ServingError):
    code = grpc.StatusCode.PERMISSION_DENIED


class NotConfigured(ServingError):
    """The server is not set up for this call; retrying will not help."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class RefusedBundle(ServingError):
    """A bundle that failed to load; the previous model keeps serving."""

    code = grpc.StatusCode.FAILED_PRECONDITION
