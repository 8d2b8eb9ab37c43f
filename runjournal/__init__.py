"""runjournal: durable side effects for Python services, without a server.

A handler calls ``ctx.run(fn)``; the outcome of ``fn`` is journaled before
the handler goes on, and a replay of the same invocation returns it without
calling ``fn`` again::

    from runjournal import Context, Runtime

    rt = Runtime("lmdb:///var/lib/shop/journal")

    @rt.handler("orders.process")
    def process_order(ctx: Context, order: dict) -> dict:
        tracking = ctx.run(lambda: shipping.schedule(order), name="schedule-shipment")
        return {"tracking": tracking}

The three layers are subpackages: :mod:`runjournal.journal` (records, the
backend protocol, codecs, errors, the conformance kit), :mod:`runjournal.backends`
(engines and the URL registry) and :mod:`runjournal.context` (the run/retry
logic). Importing this package loads neither lmdb nor boto3.
"""

from runjournal.backends import MemoryBackend, open_backend, register_backend
from runjournal.context import (
    AsyncContext,
    AsyncRunFuture,
    Context,
    ContextMisuseError,
    HandlerNotFound,
    InvocationMismatch,
    InvocationTimeout,
    LeaseLost,
    NonDeterminismError,
    RecoveryResult,
    RetryDetails,
    RunFuture,
    RunOptions,
    Runtime,
    StepInfo,
    StepInterrupted,
    TerminalError,
    current_step,
    set_testing,
)
from runjournal.journal import (
    BackendUnavailable,
    Codec,
    CodecError,
    EntryConflict,
    InvocationStatus,
    JournalBackend,
    JournalCorrupt,
    JournalError,
    JSONCodec,
    MsgpackCodec,
    TransientError,
)

__all__ = [
    "AsyncContext",
    "AsyncRunFuture",
    "BackendUnavailable",
    "Codec",
    "CodecError",
    "Context",
    "ContextMisuseError",
    "EntryConflict",
    "HandlerNotFound",
    "InvocationMismatch",
    "InvocationStatus",
    "InvocationTimeout",
    "JSONCodec",
    "JournalBackend",
    "JournalCorrupt",
    "JournalError",
    "LeaseLost",
    "MemoryBackend",
    "MsgpackCodec",
    "NonDeterminismError",
    "RecoveryResult",
    "RetryDetails",
    "RunFuture",
    "RunOptions",
    "Runtime",
    "StepInfo",
    "StepInterrupted",
    "TerminalError",
    "TransientError",
    "current_step",
    "open_backend",
    "register_backend",
    "set_testing",
]
