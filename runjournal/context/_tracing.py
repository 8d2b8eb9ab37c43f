"""OpenTelemetry spans for invocations and steps (the ``otel`` extra).

With ``opentelemetry-api`` installed, every invocation attempt is a span named
``invoke <handler>`` and every attempt of a step a child span ``run <step>``;
a retry is an event on the invocation's span. Names stay low-cardinality; ids
are attributes (``runjournal.invocation_id``, ``runjournal.handler``,
``runjournal.step``, ``runjournal.index``, ``runjournal.attempt``,
``runjournal.replayed``, ``runjournal.worker_id``). A replayed step costs no
span unless ``Runtime(trace_replays=True)``. Without the package nothing here
runs: the core checks one attribute for None.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from runjournal.context._retry import RetryDetails

__all__ = ["AttemptTracing", "Tracing", "tracing_available"]

_NAME = "runjournal"


def tracing_available() -> bool:
    """Whether ``opentelemetry-api`` is installed (and importable)."""
    try:
        import opentelemetry.trace  # noqa: F401
    except ImportError:
        return False
    return True


class Tracing:
    """Where a Runtime's spans go: a tracer from ``tracer_provider`` (default: the
    global one the application configured).

    Args:
        tracer_provider: an OpenTelemetry ``TracerProvider``, or None for the global one.
        replays: also make a (zero-length) span for each replayed step.
    """

    def __init__(self, tracer_provider: Any = None, *, replays: bool = False) -> None:
        from opentelemetry import trace

        self.trace = trace
        self.tracer = trace.get_tracer(_NAME, tracer_provider=tracer_provider)
        self.replays = replays
        self._given = tracer_provider is not None

    def active(self) -> bool:
        """Whether spans would go anywhere: a provider was given, or the application set
        a real global one (until then OpenTelemetry's are no-ops, and a step skips even
        those: they cost several microseconds each)."""
        if self._given:
            return True
        provider = self.trace.get_tracer_provider()
        return not isinstance(
            provider, (self.trace.ProxyTracerProvider, self.trace.NoOpTracerProvider)
        )

    def invocation(
        self, invocation_id: str, handler: str, worker_id: str, *, resumed: bool
    ) -> AbstractContextManager[AttemptTracing]:
        """The span of one invocation attempt; yields what its steps' spans hang from."""
        return self._invocation(invocation_id, handler, worker_id, resumed)

    @contextmanager
    def _invocation(
        self, invocation_id: str, handler: str, worker_id: str, resumed: bool
    ) -> Iterator[AttemptTracing]:
        attributes: dict[str, Any] = {
            "runjournal.invocation_id": invocation_id,
            "runjournal.handler": handler,
            "runjournal.worker_id": worker_id,
            "runjournal.resumed": resumed,
        }
        with self.tracer.start_as_current_span(f"invoke {handler}", attributes=attributes) as span:
            yield AttemptTracing(self, span, invocation_id, handler)


class AttemptTracing:
    """The spans of one invocation attempt's steps (usable from any thread)."""

    def __init__(self, tracing: Tracing, span: Any, invocation_id: str, handler: str) -> None:
        self._tracing = tracing
        self._span = span
        self._parent = tracing.trace.set_span_in_context(span)
        self.invocation_id = invocation_id
        self.handler = handler

    def step(self, name: str | None, index: int, attempt: int) -> AbstractContextManager[Any]:
        """The span of one attempt of a step (a child of the invocation's span)."""
        return self._step(name, index, attempt, replayed=False)

    def replayed(self, name: str | None, index: int) -> None:
        """A replayed step: a zero-length span, if replays are traced."""
        if self._tracing.replays:
            with self._step(name, index, 0, replayed=True):
                pass

    def _step(
        self, name: str | None, index: int, attempt: int, *, replayed: bool
    ) -> AbstractContextManager[Any]:
        attributes: dict[str, Any] = {
            "runjournal.invocation_id": self.invocation_id,
            "runjournal.handler": self.handler,
            "runjournal.index": index,
            "runjournal.replayed": replayed,
        }
        if name is not None:
            attributes["runjournal.step"] = name
        if attempt:
            attributes["runjournal.attempt"] = attempt
        return self._tracing.tracer.start_as_current_span(
            f"run {name or 'step'}", context=self._parent, attributes=attributes
        )

    def retry(self, details: RetryDetails) -> None:
        """A failed step attempt that will be retried: an event on the invocation's span."""
        self._span.add_event(
            "runjournal.retry",
            {
                "runjournal.step": details.name or "",
                "runjournal.index": details.index if details.index is not None else -1,
                "runjournal.attempt": details.attempt,
                "runjournal.next_delay": details.next_delay,
                "exception.type": type(details.error).__qualname__,
                "exception.message": str(details.error),
            },
        )
