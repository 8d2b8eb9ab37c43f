"""The S3 engine's error mapping, alone: botocore exceptions built by hand. No server."""

from __future__ import annotations

import re
from typing import Any

import botocore.exceptions
import pytest

from runjournal.backends.s3._errors import NoSuchKey, PreconditionFailed, s3_errors
from runjournal.journal import BackendUnavailable, JournalError, TransientError


def client_error(
    code: str | None,
    status: int | None,
    *,
    message: str | None = None,
    retry_attempts: int | None = None,
    operation: str = "PutObject",
) -> botocore.exceptions.ClientError:
    """What botocore raises for an error answer (its ``response`` dict, as parsed)."""
    response: dict[str, Any] = {"Error": {}, "ResponseMetadata": {}}
    if code is not None:
        response["Error"]["Code"] = code
    if message is not None:
        response["Error"]["Message"] = message
    if status is not None:
        response["ResponseMetadata"]["HTTPStatusCode"] = status
    if retry_attempts is not None:
        response["ResponseMetadata"]["RetryAttempts"] = retry_attempts
    return botocore.exceptions.ClientError(response, operation)


def mapped(exc: BaseException, *, attempt: int = 1) -> BaseException:
    """What ``s3_errors`` turns ``exc`` into (``exc`` itself if it lets it through)."""
    try:
        with s3_errors("PutObject", "bucket", "p/ent/k/1", attempt):
            raise exc
    except BaseException as out:
        return out
    raise AssertionError("s3_errors swallowed the exception")


@pytest.mark.parametrize(
    ("error", "expected", "match"),
    [
        # Conditional writes refused: the engine's conflict signal.
        (client_error("PreconditionFailed", 412), PreconditionFailed, "precondition"),
        (client_error(None, 412), PreconditionFailed, "precondition"),
        (client_error("PreconditionFailed", None), PreconditionFailed, "precondition"),
        # Missing keys (GET answers NoSuchKey; HEAD has no body, so "404").
        (client_error("NoSuchKey", 404), NoSuchKey, "p/ent/k/1"),
        (client_error("404", 404), NoSuchKey, "p/ent/k/1"),
        (client_error(None, 404), NoSuchKey, "p/ent/k/1"),
        # The store cannot be used as configured: not retried.
        (client_error("NoSuchBucket", 404), BackendUnavailable, "bucket 'bucket' does not exist"),
        (client_error("AccessDenied", 403), BackendUnavailable, r"access denied \(AccessDenied\)"),
        (client_error("InvalidAccessKeyId", 403), BackendUnavailable, "access denied"),
        (client_error("ExpiredToken", 400), BackendUnavailable, "access denied"),
        (client_error(None, 403), BackendUnavailable, r"access denied \(403\)"),
        (client_error("PermanentRedirect", 301), BackendUnavailable, "pass region="),
        (client_error(None, 301), BackendUnavailable, "another region"),
        (client_error("AuthorizationHeaderMalformed", 400), BackendUnavailable, "region"),
        (client_error("NotImplemented", 501), BackendUnavailable, "conditional writes"),
        (client_error(None, 501), BackendUnavailable, "does not implement"),
        # Transient: retried by the request layer.
        (client_error("SlowDown", 503), TransientError, "SlowDown"),
        (client_error("InternalError", 500), TransientError, "InternalError"),
        (client_error(None, 502), TransientError, "502"),
        (client_error("ConditionalRequestConflict", 409), TransientError, "Conditional"),
        (client_error(None, 409), TransientError, "409"),
        (client_error("TooManyRequests", 429), TransientError, "TooManyRequests"),
        (client_error("RequestTimeout", 400), TransientError, "RequestTimeout"),
        (client_error("ThrottlingException", 400), TransientError, "Throttling"),
        # Anything else: the store refused, plainly.
        (client_error("InvalidArgument", 400), JournalError, "refused the request"),
        (client_error("EntityTooLarge", 400), JournalError, "EntityTooLarge"),
    ],
)
def test_client_errors(
    error: botocore.exceptions.ClientError, expected: type[BaseException], match: str
) -> None:
    out = mapped(error)
    assert type(out) is expected
    assert out.__cause__ is error
    if isinstance(out, JournalError):
        assert str(out).startswith("S3 PutObject s3://bucket/p/ent/k/1: ")
    assert re.search(match, str(out)), str(out)


def test_the_message_of_the_store_is_kept() -> None:
    out = mapped(client_error("SlowDown", 503, message="Please reduce your request rate."))
    assert str(out) == (
        "S3 PutObject s3://bucket/p/ent/k/1: SlowDown: Please reduce your request rate."
    )


@pytest.mark.parametrize(
    ("attempt", "retry_attempts", "retried"),
    [(1, None, False), (1, 0, False), (2, None, True), (1, 1, True), (3, 2, True)],
)
def test_a_refusal_after_a_retry_may_be_our_own_write(
    attempt: int, retry_attempts: int | None, retried: bool
) -> None:
    error = client_error("PreconditionFailed", 412, retry_attempts=retry_attempts)
    out = mapped(error, attempt=attempt)
    assert isinstance(out, PreconditionFailed)
    assert out.retried is retried


@pytest.mark.parametrize(
    ("error", "expected", "match"),
    [
        (botocore.exceptions.NoCredentialsError(), BackendUnavailable, "no usable AWS credentials"),
        (
            botocore.exceptions.PartialCredentialsError(provider="env", cred_var="SECRET"),
            BackendUnavailable,
            "PartialCredentialsError",
        ),
        (
            botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),
            TransientError,
            "EndpointConnectionError",
        ),
        (
            botocore.exceptions.ConnectionClosedError(endpoint_url="http://127.0.0.1:1"),
            TransientError,
            "ConnectionClosedError",
        ),
        (
            botocore.exceptions.ReadTimeoutError(endpoint_url="http://127.0.0.1:1"),
            TransientError,
            "ReadTimeoutError",
        ),
        (ConnectionResetError(104, "reset by peer"), TransientError, "reset by peer"),
        (
            botocore.exceptions.ParamValidationError(report="Invalid bucket name"),
            BackendUnavailable,
            "Invalid bucket name",
        ),
    ],
)
def test_botocore_errors(error: Exception, expected: type[JournalError], match: str) -> None:
    out = mapped(error)
    assert type(out) is expected
    assert out.__cause__ is error
    assert str(out).startswith("S3 PutObject s3://bucket/p/ent/k/1: ")
    assert re.search(match, str(out)), str(out)


def test_no_credential_ever_shows() -> None:
    error = client_error("SignatureDoesNotMatch", 403, message="secret hunter2 was wrong")
    out = mapped(error)
    assert isinstance(out, BackendUnavailable)
    assert "hunter2" not in str(out)


def test_other_exceptions_pass_through_untouched() -> None:
    for error in (ValueError("mine"), KeyError("k"), JournalError("already mapped")):
        assert mapped(error) is error


def test_nothing_happens_without_an_error() -> None:
    with s3_errors("GetObject", "bucket", "key", 1):
        value = 42
    assert value == 42
