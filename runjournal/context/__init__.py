"""The run/retry core: Runtime, Context, options and the errors handlers see.

Imports only :mod:`journal`; engines are chosen at the edge.
"""

from runjournal.context._context import Context
from runjournal.context._errors import (
    ContextMisuseError,
    HandlerNotFound,
    InvocationMismatch,
    NonDeterminismError,
    TerminalError,
)
from runjournal.context._futures import RunFuture
from runjournal.context._options import RunOptions
from runjournal.context._retry import Clock, RetryDetails, SystemClock, is_testing, set_testing
from runjournal.context._runtime import HandlerSpec, RecoveryResult, Runtime

__all__ = [
    "Clock",
    "Context",
    "ContextMisuseError",
    "HandlerNotFound",
    "HandlerSpec",
    "InvocationMismatch",
    "NonDeterminismError",
    "RecoveryResult",
    "RetryDetails",
    "RunFuture",
    "RunOptions",
    "Runtime",
    "SystemClock",
    "TerminalError",
    "is_testing",
    "set_testing",
]
