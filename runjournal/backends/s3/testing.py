"""A moto S3 server over HTTP on 127.0.0.1 for tests and benchmarks, and tools to poke at it.

Nothing here reaches the network: the server listens on 127.0.0.1, clients
get dummy credentials, and every request goes over real HTTP to it. Needs
moto (the ``test`` extra): import it from tests and benchmarks only; the
engine never does.

Example::

    with running_moto() as server:
        backend = S3Backend(server.client(), server.new_bucket(), owns_client=True)
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import boto3
import botocore.config
import urllib3
from botocore.awsrequest import AWSResponse
from botocore.exceptions import ConnectionClosedError
from moto.moto_server import werkzeug_app
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

__all__ = [
    "DUMMY_ENV",
    "UNSET_ENV",
    "Faults",
    "MotoS3",
    "RequestCounter",
    "dummy_aws_env",
    "error_response",
    "running_moto",
    "strip_conditional_headers",
]

DUMMY_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
UNSET_ENV = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL")


@contextmanager
def dummy_aws_env() -> Iterator[None]:
    """Dummy credentials and region for this process (and its children), restored after."""
    saved = {name: os.environ.get(name) for name in (*DUMMY_ENV, *UNSET_ENV)}
    os.environ.update(DUMMY_ENV)
    for name in UNSET_ENV:
        os.environ.pop(name, None)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class _AtomicConditionalWrites:
    """WSGI middleware: one conditional PUT at a time.

    moto checks If-None-Match / If-Match and then writes, without a lock, so
    two racing requests can both pass the check. AWS S3 (and MinIO, R2)
    evaluate the condition atomically with the write; serialising conditional
    PUTs makes moto behave like them, so the race tests test the engine and
    not moto's check-then-write.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self.lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        conditional = environ.get("REQUEST_METHOD") == "PUT" and (
            "HTTP_IF_NONE_MATCH" in environ or "HTTP_IF_MATCH" in environ
        )
        if not conditional:
            return self.app(environ, start_response)
        with self.lock:
            # Consume the response inside the lock: the write happens while
            # moto builds it.
            return list(self.app(environ, start_response))


class MotoS3:
    """A moto server on 127.0.0.1 (an OS-chosen port) with S3 conditional writes."""

    def __init__(self) -> None:
        self.endpoint_url = ""
        self.session = boto3.session.Session()
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Serve on a thread of its own; ``endpoint_url`` says where."""
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        app = werkzeug_app.DomainDispatcherApplication(werkzeug_app.create_backend_app)
        # moto's own handler (newer moto) keeps S3 metadata headers with underscores.
        handler = getattr(werkzeug_app, "MotoRequestHandler", WSGIRequestHandler)
        self._server = make_server(
            "127.0.0.1", 0, _AtomicConditionalWrites(app), threaded=True, request_handler=handler
        )
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="moto-s3", daemon=True
        )
        self._thread.start()
        host, port = self._server.server_address[:2]
        self.endpoint_url = f"http://{host!s}:{port}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join()
        self._server = self._thread = None

    def client(self, *, pool: int = 32) -> Any:
        """A new boto3 S3 client of this server, without retries of its own."""
        return self.session.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name="us-east-1",
            config=botocore.config.Config(
                retries={"total_max_attempts": 1, "mode": "standard"},
                max_pool_connections=pool,
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )

    def new_bucket(self) -> str:
        name = f"rj-{uuid.uuid4().hex[:20]}"
        self.client().create_bucket(Bucket=name)
        return name


@contextmanager
def running_moto() -> Iterator[MotoS3]:
    """Start a moto S3 server with dummy credentials in the environment; stop it after."""
    with dummy_aws_env():
        server = MotoS3()
        server.start()
        try:
            yield server
        finally:
            server.stop()


class RequestCounter:
    """Counts the HTTP requests of clients by S3 operation (botocore's before-send event)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: collections.Counter[str] = collections.Counter()

    def attach(self, client: Any) -> Any:
        client.meta.events.register("before-send.s3", self._count)
        return client

    def _count(self, event_name: str, **_: Any) -> None:
        with self._lock:
            self.counts[event_name.rsplit(".", 1)[-1]] += 1

    def reset(self) -> None:
        with self._lock:
            self.counts.clear()

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self.counts.values())


class _Raw:
    def __init__(self, body: bytes) -> None:
        self.body = body

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self.body


def error_response(url: str, status: int, code: str) -> AWSResponse:
    body = (
        f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
        f"<Message>injected {code}</Message></Error>"
    ).encode()
    return AWSResponse(url, status, {"Content-Type": "application/xml"}, _Raw(body))


class Faults:
    """Injects failures into one client's requests of one operation.

    ``plan`` is consumed one fault per request: ``"500"``, ``"503"`` (SlowDown),
    ``"409"`` (ConditionalRequestConflict), ``"drop"`` (the connection breaks
    before the request reaches the server), ``"lost"`` (the request is
    delivered and applied, then the connection breaks before the answer) or
    ``None`` (let it through). ``when`` picks which requests the plan applies to.
    """

    def __init__(
        self,
        client: Any,
        operation: str = "PutObject",
        *,
        when: Callable[[Any], bool] = lambda request: True,
    ) -> None:
        self.plan: collections.deque[str | None] = collections.deque()
        self.injected: collections.Counter[str] = collections.Counter()
        self.when = when
        self._http = urllib3.PoolManager()
        self._lock = threading.Lock()
        client.meta.events.register(f"before-send.s3.{operation}", self._before_send)

    def add(self, *faults: str | None) -> Faults:
        with self._lock:
            self.plan.extend(faults)
        return self

    def _before_send(self, request: Any, **_: Any) -> AWSResponse | None:
        if not self.when(request):
            return None
        with self._lock:
            fault = self.plan.popleft() if self.plan else None
            if fault is not None:
                self.injected[fault] += 1
        if fault is None:
            return None
        if fault == "500":
            return error_response(request.url, 500, "InternalError")
        if fault == "503":
            return error_response(request.url, 503, "SlowDown")
        if fault == "409":
            return error_response(request.url, 409, "ConditionalRequestConflict")
        if fault == "lost":
            body = request.body
            if hasattr(body, "read"):
                body = body.read()
            self._http.request(
                request.method,
                request.url,
                body=body,
                headers=dict(request.headers.items()),
                retries=False,
            )
        if fault in ("drop", "lost"):
            raise ConnectionClosedError(endpoint_url=request.url)
        raise AssertionError(f"unknown fault {fault!r}")


def strip_conditional_headers(client: Any) -> None:
    """Make ``client`` talk to a store that ignores If-None-Match / If-Match on PUT."""

    def strip(request: Any, **_: Any) -> None:
        for name in ("If-None-Match", "If-Match"):
            if name in request.headers:
                del request.headers[name]

    client.meta.events.register("before-sign.s3.PutObject", strip)
