"""The timeline ``runjournal show`` draws: one text bar per step on a shared time axis.

What the journal knows, and so what a bar means
-----------------------------------------------

The journal records when an invocation was created, when its record was last
written (for a finished one: when it finished), and for every step the moment
its outcome was journaled (``Entry.created_at``). It does not record when a
step *started*. So a bar ends exactly where the step's outcome was journaled,
and starts at the latest moment the step is known not to have been called
yet:

- the invocation's creation, or
- the journaling of an earlier step (lower index) that the handler waited
  for before going on: a ``run`` / ``run_void`` (``run`` returns only once
  its outcome is durable) or a ``wait_first`` / ``wait``.

Steps that were passed to a ``wait_first`` / ``wait`` are futures
(``run_async``): the handler did not wait for them, so they never start
another step's bar. A future never waited on through ``wait``/``wait_first``
(only ``fut.result()``) cannot be told from a ``run`` in the journal and is
taken for one; a later step recorded before it is then not held to it.

A bar therefore covers the whole step: all of its attempts and the backoff
between them (the attempts column says how many), plus whatever the handler
did between the previous waited-for step and this call, plus, after a crash,
the time until a worker replayed the invocation up to it. For steps run one
after another that is where the time went; for futures started together the
bars overlap, and each starts when the batch could have started.

A step with no outcome yet (a pending invocation whose step failed and is
being retried, or was interrupted) has durable progress on the record: its
first attempt's real start (``StepProgress.first_started_at``) and the count
of attempts begun so far. Its bar runs from that start to the record's last write
and ends in ``>``: not finished. A step whose outcome is a terminal failure
ends in ``X``.

The axis runs from the invocation's creation (0) to its last known moment:
the last write of its record (its end, once finished) or its last entry.
"""

from __future__ import annotations

import attrs

from runjournal._cli_ops._units import format_seconds
from runjournal.context._futures import read_decision
from runjournal.journal import Entry, EntryKind, Invocation, JournalCorrupt

__all__ = ["HELP", "Bar", "bars", "render", "span_of"]

#: What a bar means, for ``runjournal show --help``.
HELP: str = __doc__ or ""


@attrs.frozen
class Bar:
    """One step's place on the timeline, in seconds from the invocation's creation.

    Attributes:
        index: the step's journal index.
        label: ``#index name`` (or the kind for a wait).
        start: the latest moment the step is known not to have been called.
        end: when its outcome was journaled (for an open step: the record's
            last write).
        attempts: attempts it took (an open step: attempts begun so far).
        failed: its outcome is a terminal failure.
        open: it has no outcome yet.
        future: it was passed to a ``wait`` / ``wait_first`` (a ``run_async``).
    """

    index: int
    label: str
    start: float
    end: float
    attempts: int
    failed: bool = False
    open: bool = False
    future: bool = False

    def as_json(self) -> dict[str, object]:
        return attrs.asdict(self)


def _label(entry: Entry) -> str:
    if entry.kind is EntryKind.RUN:
        return f"#{entry.index} {entry.name or 'run'}"
    return f"#{entry.index} {entry.kind.value}"


def _futures(entries: list[Entry]) -> set[int]:
    found: set[int] = set()
    for entry in entries:
        if entry.kind is not EntryKind.RUN:
            try:
                members, _ = read_decision(entry)
            except JournalCorrupt:
                continue
            found.update(members)
    return found


def bars(inv: Invocation, entries: list[Entry]) -> list[Bar]:
    """The bars of ``inv``'s steps, in index order (see the module docstring)."""
    origin = inv.created_at
    futures = _futures(entries)
    # Journaled moments of steps the handler waited for, in index order.
    waited: list[tuple[int, float]] = [
        (e.index, e.created_at - origin) for e in entries if e.index not in futures
    ]
    result = []
    for entry in entries:
        end = max(0.0, entry.created_at - origin)
        known = [at for index, at in waited if index < entry.index and at <= end]
        start = max([0.0, *known])
        result.append(
            Bar(
                index=entry.index,
                label=_label(entry),
                start=start,
                end=end,
                attempts=entry.attempts,
                failed=entry.failure is not None,
                future=entry.index in futures,
            )
        )
    recorded = {e.index for e in entries}
    last_write = max(0.0, inv.updated_at - origin)
    for step in inv.steps:
        if step.index in recorded:
            continue  # progress left over from before its outcome was journaled
        start = max(0.0, step.first_started_at - origin)
        result.append(
            Bar(
                index=step.index,
                label=f"#{step.index} (no outcome yet)",
                start=start,
                end=max(start, last_write),
                attempts=step.attempts,
                open=True,
            )
        )
    return sorted(result, key=lambda bar: bar.index)


def span_of(inv: Invocation, drawn: list[Bar]) -> float:
    """The axis length in seconds: the invocation's last known moment."""
    return max([inv.updated_at - inv.created_at, *(bar.end for bar in drawn), 0.0])


def render(drawn: list[Bar], span: float, *, width: int = 48, label_width: int = 24) -> list[str]:
    """The timeline as lines of text: a scale line, then one line per bar.

    Each line is ``label |bar| duration notes``; every bar's column ``c``
    stands for ``c * span / width`` seconds after the invocation's creation.
    """
    width = max(width, 10)
    scale = span / width if span > 0 else 0.0
    right = format_seconds(span)
    lines = [" " * (label_width + 2) + "0" + right.rjust(width - 1)]
    for bar in drawn:
        first = _column(bar.start, scale, width)
        last = max(first, _column(bar.end, scale, width))
        cells = [" "] * width
        for col in range(first, last + 1):
            cells[col] = "="
        cells[last] = ">" if bar.open else "X" if bar.failed else "#"
        notes = [format_seconds(bar.end - bar.start)]
        if bar.attempts != 1 or bar.open:
            plural = "s" if bar.attempts != 1 else ""
            notes.append(f"{bar.attempts} attempt{plural}{' so far' if bar.open else ''}")
        if bar.future:
            notes.append("future")
        if bar.failed:
            notes.append("terminal failure")
        label = bar.label if len(bar.label) <= label_width else bar.label[: label_width - 3] + "..."
        lines.append(f"{label:<{label_width}} |{''.join(cells)}| {'  '.join(notes)}")
    return lines


def _column(at: float, scale: float, width: int) -> int:
    if scale <= 0:
        return 0
    return min(width - 1, max(0, int(at / scale)))
