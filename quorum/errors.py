"""Quorum's exception tree, in one place (like httpx's ``_exceptions.py``).

::

    QuorumError
    ├── ApiError                  an OpenAI-style error answer: status + envelope
    │   ├── InvalidRequest        400 invalid_request_error (``param`` says which field)
    │   │   └── ConversationTooLong   400 a conversation would pass its message limit
    │   ├── Unauthorized          401 a missing, wrong or unsigned credential
    │   ├── PermissionDenied      403 the caller may not do this
    │   ├── ModelNotFound         404 model_not_found
    │   ├── ConversationNotFound  404 conversation_not_found (unknown, deleted or another key's)
    │   ├── RequestTimeout        408 the request body did not arrive in time
    │   ├── PayloadTooLarge       413 request body over the node's limit
    │   │   └── MessageTooLarge   413 one message over the conversation store's limit
    │   ├── Saturated             429 rate_limit_exceeded, with ``Retry-After``
    │   ├── UpstreamFailed        502 every candidate failed before the first byte
    │   └── Unavailable           503 no node can serve the request now
    └── BackendError              a backend could not do what it was asked
        ├── BackendSaturated      slots and queue full (local, before any byte)
        ├── BackendUnavailable    could not reach it / it answered an error status (before any byte)
        └── BackendBroken         it broke after producing bytes (reset, EOF without [DONE])

``ApiError`` is what the HTTP layer turns into a response. ``BackendError`` is raised by
backends and by the relay; the router decides whether it becomes a retry, a resume or an
``ApiError``. "We closed it" (cancellation) is never one of these: ``trio.Cancelled``
propagates untouched.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ApiError",
    "BackendBroken",
    "BackendError",
    "BackendSaturated",
    "BackendUnavailable",
    "ConversationNotFound",
    "ConversationTooLong",
    "InvalidRequest",
    "MessageTooLarge",
    "ModelNotFound",
    "PayloadTooLarge",
    "PermissionDenied",
    "QuorumError",
    "RequestTimeout",
    "Saturated",
    "TooManyConversations",
    "Unauthorized",
    "Unavailable",
    "UpstreamFailed",
]


class QuorumError(Exception):
    """Root of every exception Quorum raises on purpose."""


class ApiError(QuorumError):
    """An error answered to the client in OpenAI's envelope.

    ``status``: HTTP status code. ``message``: says what to fix. ``type``: OpenAI's error
    type (``invalid_request_error``, ``server_error``, ...). ``param``: the offending request
    field as a dotted path (``messages[0].content``) or None. ``code``: a short machine code
    or None. ``retry_after``: seconds, sent as the ``Retry-After`` header when set.
    ``headers``: more headers for the answer (a quota refusal's ``x-quota-*``).
    """

    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        retry_after: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.headers = dict(headers or {})
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        """The OpenAI error envelope: ``{"error": {"message", "type", "param", "code"}}``."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequest(ApiError):
    """400: the request body is not a valid request; ``param`` names the field."""

    status = 400
    type = "invalid_request_error"


class Unauthorized(ApiError):
    """401: no credential, a wrong one, or internal headers without a valid cluster
    signature."""

    status = 401
    type = "invalid_request_error"


class PermissionDenied(ApiError):
    """403: the caller is known but may not do this (``code`` ``permission_denied``)."""

    status = 403
    type = "invalid_request_error"
    code = "permission_denied"


class ConversationTooLong(InvalidRequest):
    """400: appending would take a stored conversation past its store's ``max_messages``;
    nothing was appended (``code`` ``conversation_too_long``)."""

    code = "conversation_too_long"


class TooManyConversations(InvalidRequest):
    """400: the caller's key already keeps its store's ``max_conversations``; nothing was
    created (``code`` ``too_many_conversations``). Not retried by the SDKs: deleting one is
    the fix."""

    code = "too_many_conversations"


class RequestTimeout(ApiError):
    """408: the client did not send its whole request body within the node's deadline."""

    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class ModelNotFound(ApiError):
    """404: no node in the cluster serves the requested model."""

    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class ConversationNotFound(ApiError):
    """404: no conversation has this id for this caller: never created, deleted, or owned by
    another API key (the three are not told apart, so ids of other keys do not leak)."""

    status = 404
    type = "invalid_request_error"
    code = "conversation_not_found"


class PayloadTooLarge(ApiError):
    """413: the body is larger than the node's ``max_body_bytes``."""

    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class MessageTooLarge(PayloadTooLarge):
    """413: one message, as stored JSON, is larger than the conversation store's
    ``max_message_bytes``; nothing was appended (``code`` ``message_too_large``)."""

    code = "message_too_large"


class Saturated(ApiError):
    """429: every candidate's slots and queue are full; retry after ``retry_after`` s."""

    status = 429
    type = "rate_limit_exceeded"
    code = "rate_limit_exceeded"


class UpstreamFailed(ApiError):
    """502: every candidate failed before the first byte reached the client."""

    status = 502
    type = "server_error"
    code = "upstream_failed"


class Unavailable(ApiError):
    """503: the model exists but no node can serve it now (all down, warming or draining)."""

    status = 503
    type = "server_error"
    code = "unavailable"


class BackendError(QuorumError):
    """A backend could not do what it was asked. ``status``: the HTTP status it maps to."""

    status = 502

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status


class BackendSaturated(BackendError):
    """Every slot is busy and the queue is full; nothing was started."""

    status = 429

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class BackendUnavailable(BackendError):
    """The backend could not be reached, or refused before producing any byte."""

    status = 502


class BackendBroken(BackendError):
    """The backend broke after it had produced bytes (reset, EOF without [DONE], stall)."""

    status = 502
