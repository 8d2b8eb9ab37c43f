"""The run/retry core: Runtime, Context, options, leases and the errors handlers see.

Imports only :mod:`runjournal.journal`; engines are chosen at the edge.
"""

from runjournal.context._async import AsyncContext, AsyncRunFuture
from runjournal.context._context import Context
from runjournal.context._errors import (
    ContextMisuseError,
    HandlerNotFound,
    InvocationMismatch,
    InvocationTimeout,
    LeaseLost,
    NonDeterminismError,
    StepInterrupted,
    TerminalError,
)
from runjournal.context._futures import RunFuture
from runjournal.context._lease import WORKER_HANDLER, WORKER_PREFIX, is_worker_record
from runjournal.context._options import RunOptions
from runjournal.context._purge import PurgeStep, purge
from runjournal.context._retry import Clock, RetryDetails, SystemClock, is_testing, set_testing
from runjournal.context._runtime import HandlerSpec, RecoveryResult, Runtime
from runjournal.context._step import StepInfo, current_step

__all__ = [
    "WORKER_HANDLER",
    "WORKER_PREFIX",
    "AsyncContext",
    "AsyncRunFuture",
    "Clock",
    "Context",
    "ContextMisuseError",
    "HandlerNotFound",
    "HandlerSpec",
    "InvocationMismatch",
    "InvocationTimeout",
    "LeaseLost",
    "NonDeterminismError",
    "PurgeStep",
    "RecoveryResult",
    "RetryDetails",
    "RunFuture",
    "RunOptions",
    "Runtime",
    "StepInfo",
    "StepInterrupted",
    "SystemClock",
    "TerminalError",
    "current_step",
    "is_testing",
    "is_worker_record",
    "purge",
    "set_testing",
]
