"""botocore's exceptions mapped onto runjournal.journal's, one request at a time.

Callers above the request layer never catch a botocore exception: they meet
:mod:`runjournal.journal` errors, or one of the two internal signals here,
which the engine turns into a conflict, None or not-found.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final

import botocore.exceptions

from runjournal.journal import BackendUnavailable, JournalError, TransientError

__all__ = ["NoSuchKey", "PreconditionFailed", "s3_errors"]


class PreconditionFailed(Exception):
    """A conditional write was refused (412). Internal: the engine turns it into a conflict.

    ``retried`` says an earlier attempt of the same request may have landed,
    so the refusal may be caused by this very write.
    """

    def __init__(self, retried: bool) -> None:
        super().__init__("precondition failed")
        self.retried = retried


class NoSuchKey(Exception):
    """The key does not exist (404). Internal: the engine turns it into None or not-found."""


_TRANSIENT_CODES: Final = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "TooManyRequests",
        "RequestLimitExceeded",
        "RequestTimeout",
        "InternalError",
        "ServiceUnavailable",
        "ConditionalRequestConflict",
        "OperationAborted",
    }
)
_DENIED_CODES: Final = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "AccountProblem",
    }
)
_CREDENTIAL_ERRORS: Final = (
    botocore.exceptions.NoCredentialsError,
    botocore.exceptions.PartialCredentialsError,
    botocore.exceptions.CredentialRetrievalError,
    botocore.exceptions.NoAuthTokenError,
    botocore.exceptions.TokenRetrievalError,
)
_LINK_ERRORS: Final = (
    botocore.exceptions.ConnectionError,
    botocore.exceptions.HTTPClientError,
    botocore.exceptions.IncompleteReadError,
    botocore.exceptions.ChecksumError,
    OSError,
)


@contextmanager
def s3_errors(operation: str, bucket: str, key: str, attempt: int) -> Iterator[None]:
    """Map botocore's exceptions for one request onto journal's (and two internal ones).

    412 becomes :class:`PreconditionFailed`, 404 on a key :class:`NoSuchKey`;
    throttling, 5xx, 409 ConditionalRequestConflict and broken connections
    become :class:`TransientError`; a missing bucket, denied access, missing
    credentials or an unsupported feature become :class:`BackendUnavailable`;
    any other refusal :class:`JournalError`. Messages name the operation,
    bucket and key, never a credential.

    Args:
        operation: the S3 operation, for messages (``PutObject``).
        bucket: the bucket, for messages.
        key: the key (or prefix) of the request, for messages.
        attempt: 1 for the first try; above 1 a 412 may be this write's own
            earlier try (see :attr:`PreconditionFailed.retried`).
    """
    where = f"S3 {operation} s3://{bucket}/{key}"
    try:
        yield
    except botocore.exceptions.ClientError as exc:
        error = exc.response.get("Error", {})
        meta = exc.response.get("ResponseMetadata", {})
        code = str(error.get("Code", ""))
        status = int(meta.get("HTTPStatusCode") or 0)
        message = error.get("Message") or code or f"HTTP {status}"
        if status == 412 or code == "PreconditionFailed":
            retried = attempt > 1 or int(meta.get("RetryAttempts") or 0) > 0
            raise PreconditionFailed(retried) from exc
        if code == "NoSuchBucket":
            raise BackendUnavailable(
                f"{where}: bucket {bucket!r} does not exist (or is in another account); "
                "create it, or fix the URL"
            ) from exc
        if code in ("NoSuchKey", "404") or status == 404:
            raise NoSuchKey(key) from exc
        if code in _DENIED_CODES or status == 403:
            raise BackendUnavailable(
                f"{where}: access denied ({code or status}); check the credentials boto3 "
                "found (its standard chain) and the bucket policy: the engine needs "
                "GetObject, PutObject, DeleteObject and ListBucket on the prefix"
            ) from exc
        if code in ("PermanentRedirect", "AuthorizationHeaderMalformed") or status == 301:
            raise BackendUnavailable(
                f"{where}: the bucket lives in another region ({code}: {message}); "
                "pass region=<its region>"
            ) from exc
        if code == "NotImplemented" or status == 501:
            raise BackendUnavailable(
                f"{where}: the store does not implement this request ({message}); the S3 "
                "engine needs conditional writes (If-None-Match / If-Match on PutObject)"
            ) from exc
        if code in _TRANSIENT_CODES or status >= 500 or status in (409, 429):
            raise TransientError(f"{where}: {code or status}: {message}") from exc
        raise JournalError(f"{where}: the store refused the request: {code}: {message}") from exc
    except _CREDENTIAL_ERRORS as exc:
        raise BackendUnavailable(
            f"{where}: no usable AWS credentials ({type(exc).__name__}); configure them "
            "the standard boto3 way (environment, shared config/profile, instance role)"
        ) from exc
    except _LINK_ERRORS as exc:
        raise TransientError(f"{where}: {type(exc).__name__}: {exc}") from exc
    except botocore.exceptions.BotoCoreError as exc:
        raise BackendUnavailable(f"{where}: {type(exc).__name__}: {exc}") from exc
