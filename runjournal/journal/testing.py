"""The conformance kit: tests every journal engine must pass.

Subclass :class:`JournalBackendTests` in a test module and override one
fixture, ``open_backend``, returning a callable that opens a *new client* on
one fresh store each time it is called (two calls = two clients of the same
journal, as two workers would have)::

    from runjournal.journal.testing import JournalBackendTests

    class TestMyEngine(JournalBackendTests):
        @pytest.fixture
        def open_backend(self, tmp_path):
            return lambda: MyEngine.from_url(f"my://{tmp_path}")

Optional hooks: override :meth:`corrupt_entry` / :meth:`corrupt_invocation`
to damage stored bytes in place (the corruption tests skip otherwise), and
:meth:`reference_backend` to compare against another engine than the model.
Tests that need a capability (``persistent``) skip themselves when the
engine does not claim it. Needs pytest and hypothesis.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, rule, run_state_machine_as_test

from runjournal.journal._errors import (
    BackendUnavailable,
    EntryConflict,
    InvocationNotFound,
    JournalCorrupt,
    JournalError,
    VersionConflict,
)
from runjournal.journal._protocol import (
    AppendEntry,
    BatchWriter,
    Capabilities,
    CreateInvocation,
    JournalBackend,
    UpdateInvocation,
    Write,
    write_each,
)
from runjournal.journal._records import Entry, EntryKind, Failure, Invocation, InvocationStatus

__all__ = [
    "AWKWARD_IDS",
    "JournalBackendTests",
    "ModelJournal",
    "Opener",
    "make_entry",
    "make_invocation",
]

Opener = Callable[[], JournalBackend]

#: Ids an engine must store without escaping, colliding or mangling them.
AWKWARD_IDS = [
    "plain",
    "with/slash",
    "../../escape",
    "..",
    "with space",
    "ünïcødé-ключ-鍵",
    "x" * 300,
    "trailing/",
    "%2F-percent",
    "a\\b",
    "with:colon?and#hash",
]


def make_invocation(invocation_id: str | None = None, **changes: Any) -> Invocation:
    """An invocation record with sensible defaults, for tests."""
    now = time.time()
    fields: dict[str, Any] = {
        "id": invocation_id or f"inv-{uuid.uuid4().hex}",
        "handler": "tests.handler",
        "input": b'{"order":42}',
        "codec": "json",
        "created_at": now,
        "updated_at": now,
    }
    fields.update(changes)
    return Invocation(**fields)


def make_entry(index: int, payload: bytes | None = b'"ok"', **changes: Any) -> Entry:
    """An entry record with sensible defaults, for tests."""
    fields: dict[str, Any] = {
        "index": index,
        "kind": EntryKind.RUN,
        "name": f"step-{index}",
        "payload": payload,
        "codec": "json",
        "created_at": time.time(),
    }
    fields.update(changes)
    return Entry(**fields)


def _race(n: int, work: Callable[[int], Any]) -> list[Any]:
    """Run ``work(i)`` in ``n`` threads released at once; return results or exceptions."""
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n

    def target(i: int) -> None:
        barrier.wait()
        try:
            results[i] = work(i)
        except BaseException as exc:  # collected and checked by the caller
            results[i] = exc

    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


class JournalBackendTests:
    """The conformance suite. Override the ``open_backend`` fixture."""

    #: Threads used by the race tests.
    race_threads = 16

    @pytest.fixture
    def open_backend(self) -> Opener:
        raise NotImplementedError(
            "override the open_backend fixture: return a callable that opens a new "
            "client on one fresh store"
        )

    @pytest.fixture
    def backend(self, open_backend: Opener) -> Iterator[JournalBackend]:
        client = open_backend()
        yield client
        client.close()

    @pytest.fixture
    def clients(self, open_backend: Opener) -> Iterator[Callable[[], JournalBackend]]:
        """A factory of extra clients that the test closes at teardown."""
        opened: list[JournalBackend] = []

        def make() -> JournalBackend:
            client = open_backend()
            opened.append(client)
            return client

        yield make
        for client in opened:
            client.close()

    def corrupt_entry(self, backend: JournalBackend, invocation_id: str, index: int) -> None:
        """Damage the stored bytes of one entry in place. Override to enable the test."""
        pytest.skip("this engine's kit subclass does not implement corrupt_entry")

    def corrupt_invocation(self, backend: JournalBackend, invocation_id: str) -> None:
        """Damage the stored bytes of one invocation record. Override to enable the test."""
        pytest.skip("this engine's kit subclass does not implement corrupt_invocation")

    # -- the protocol's shape ------------------------------------------------

    def test_is_a_journal_backend(self, backend: JournalBackend) -> None:
        assert isinstance(backend, JournalBackend)
        caps = backend.capabilities
        assert isinstance(caps.persistent, bool)

    # -- create-or-get -------------------------------------------------------

    def test_create_then_get(self, backend: JournalBackend) -> None:
        inv = make_invocation()
        stored, created = backend.create_invocation(inv)
        assert created
        assert stored == attrs.evolve(inv, version=1)
        assert backend.get_invocation(inv.id) == stored

    def test_create_existing_returns_the_stored_record_unchanged(
        self, backend: JournalBackend
    ) -> None:
        inv = make_invocation()
        first, _ = backend.create_invocation(inv)
        again, created = backend.create_invocation(attrs.evolve(inv, input=b"other"))
        assert not created
        assert again == first
        assert backend.get_invocation(inv.id) == first

    def test_get_missing_is_none(self, backend: JournalBackend) -> None:
        assert backend.get_invocation("never-created") is None

    def test_create_race_has_one_creator(self, clients: Callable[[], JournalBackend]) -> None:
        inv_id = f"race-{uuid.uuid4().hex}"
        workers = [clients() for _ in range(4)]
        results = _race(
            self.race_threads,
            lambda i: workers[i % len(workers)].create_invocation(
                make_invocation(inv_id, input=str(i).encode())
            ),
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        assert not errors, errors
        assert sum(created for _, created in results) == 1
        assert len({stored for stored, _ in results}) == 1

    # -- compare-and-swap ----------------------------------------------------

    def test_update_bumps_version(self, backend: JournalBackend) -> None:
        stored, _ = backend.create_invocation(make_invocation())
        done = attrs.evolve(stored, status=InvocationStatus.COMPLETED, output=b'"out"')
        updated = backend.update_invocation(done)
        assert updated == attrs.evolve(done, version=2)
        assert backend.get_invocation(stored.id) == updated

    def test_update_with_stale_version_conflicts(self, backend: JournalBackend) -> None:
        stored, _ = backend.create_invocation(make_invocation())
        backend.update_invocation(attrs.evolve(stored, updated_at=stored.updated_at + 1))
        with pytest.raises(VersionConflict):
            backend.update_invocation(attrs.evolve(stored, status=InvocationStatus.FAILED))
        current = backend.get_invocation(stored.id)
        assert current is not None
        assert current.version == 2 and current.status is InvocationStatus.PENDING

    def test_update_missing_raises_not_found(self, backend: JournalBackend) -> None:
        with pytest.raises(InvocationNotFound):
            backend.update_invocation(attrs.evolve(make_invocation(), version=1))

    def test_cas_race_has_one_winner(self, clients: Callable[[], JournalBackend]) -> None:
        first = clients()
        stored, _ = first.create_invocation(make_invocation())
        workers = [clients() for _ in range(4)]
        results = _race(
            self.race_threads,
            lambda i: workers[i % len(workers)].update_invocation(
                attrs.evolve(stored, output=str(i).encode(), status=InvocationStatus.COMPLETED)
            ),
        )
        wins = [r for r in results if isinstance(r, Invocation)]
        losses = [r for r in results if isinstance(r, VersionConflict)]
        assert len(wins) == 1 and len(losses) == self.race_threads - 1, results
        assert first.get_invocation(stored.id) == wins[0]

    # -- create-only append --------------------------------------------------

    def test_append_and_read(self, backend: JournalBackend) -> None:
        inv, _ = backend.create_invocation(make_invocation())
        entries = [
            make_entry(0),
            make_entry(1, None, failure=Failure("shop.Declined", "card declined")),
            make_entry(2, b"", kind=EntryKind.WAIT_FIRST, name=None, codec="msgpack"),
            make_entry(3, bytes(range(256)) * 4, attempts=7),
        ]
        for entry in entries:
            backend.append_entry(inv.id, entry)
        assert backend.read_entries(inv.id) == entries
        assert backend.read_entries(inv.id, start=2) == entries[2:]
        assert backend.read_entries(inv.id, start=4) == []

    def test_append_is_create_only(self, backend: JournalBackend) -> None:
        inv, _ = backend.create_invocation(make_invocation())
        backend.append_entry(inv.id, make_entry(0, b'"first"'))
        with pytest.raises(EntryConflict) as info:
            backend.append_entry(inv.id, make_entry(0, b'"second"'))
        assert info.value.index == 0
        assert [e.payload for e in backend.read_entries(inv.id)] == [b'"first"']

    def test_append_to_a_missing_invocation_raises_not_found(self, backend: JournalBackend) -> None:
        with pytest.raises(InvocationNotFound):
            backend.append_entry("never-created", make_entry(0))
        assert backend.read_entries("never-created") == []
        assert backend.get_invocation("never-created") is None

    def test_append_after_delete_raises_not_found(
        self, clients: Callable[[], JournalBackend]
    ) -> None:
        writer, deleter = clients(), clients()
        inv, _ = writer.create_invocation(make_invocation())
        writer.append_entry(inv.id, make_entry(0))
        assert deleter.delete_invocation(inv.id)
        with pytest.raises(InvocationNotFound):
            deleter.append_entry(inv.id, make_entry(1))
        assert writer.read_entries(inv.id) == []

    def test_read_is_in_index_order_whatever_the_write_order(self, backend: JournalBackend) -> None:
        inv, _ = backend.create_invocation(make_invocation())
        for index in [3, 0, 11, 2, 1, 10]:
            backend.append_entry(inv.id, make_entry(index))
        assert [e.index for e in backend.read_entries(inv.id)] == [0, 1, 2, 3, 10, 11]
        assert [e.index for e in backend.read_entries(inv.id, start=3)] == [3, 10, 11]

    def test_entries_of_one_invocation_are_not_anothers(self, backend: JournalBackend) -> None:
        a, _ = backend.create_invocation(make_invocation("a"))
        b, _ = backend.create_invocation(make_invocation("ab"))
        backend.append_entry(a.id, make_entry(0, b'"a"'))
        backend.append_entry(b.id, make_entry(0, b'"b"'))
        assert [e.payload for e in backend.read_entries("a")] == [b'"a"']
        assert [e.payload for e in backend.read_entries("ab")] == [b'"b"']
        assert backend.read_entries("nothing-here") == []

    def test_append_race_has_one_winner(self, clients: Callable[[], JournalBackend]) -> None:
        first = clients()
        inv, _ = first.create_invocation(make_invocation())
        workers = [clients() for _ in range(4)]
        for index in range(3):

            def append(i: int, index: int = index) -> None:
                workers[i % len(workers)].append_entry(inv.id, make_entry(index, f'"{i}"'.encode()))

            results = _race(self.race_threads, append)
            winners = [i for i, r in enumerate(results) if r is None]
            conflicts = [r for r in results if isinstance(r, EntryConflict)]
            assert len(winners) == 1 and len(conflicts) == self.race_threads - 1, results
            recorded = first.read_entries(inv.id, start=index)[0]
            assert recorded.payload == f'"{winners[0]}"'.encode()
        assert [e.index for e in first.read_entries(inv.id)] == [0, 1, 2]

    def test_large_payload_round_trips(self, backend: JournalBackend) -> None:
        limit = backend.capabilities.max_payload_bytes
        size = min(1 << 20, (limit or 1 << 21) // 2)
        inv, _ = backend.create_invocation(make_invocation(input=b"i" * size))
        backend.append_entry(inv.id, make_entry(0, b"\x00\xff" * (size // 2)))
        assert backend.read_entries(inv.id)[0].payload == b"\x00\xff" * (size // 2)
        stored = backend.get_invocation(inv.id)
        assert stored is not None and stored.input == b"i" * size

    # -- batches (only for engines with write_batch) -------------------------

    def test_a_batch_does_each_write_as_its_single_call_would(
        self, backend: JournalBackend
    ) -> None:
        if not isinstance(backend, BatchWriter):
            pytest.skip("this engine has no write_batch")
        a = make_invocation("batch-a")
        stored, _ = backend.create_invocation(make_invocation("batch-b"))
        writes: list[Write] = [
            CreateInvocation(a),
            AppendEntry("batch-a", make_entry(0, b'"first"')),
            AppendEntry("batch-a", make_entry(0, b'"second"')),
            AppendEntry("batch-missing", make_entry(0)),
            CreateInvocation(attrs.evolve(a, input=b"other")),
            UpdateInvocation(attrs.evolve(stored, status=InvocationStatus.COMPLETED)),
            UpdateInvocation(attrs.evolve(stored, status=InvocationStatus.FAILED)),
            AppendEntry("batch-b", make_entry(3)),
        ]
        results = backend.write_batch(writes)
        created = attrs.evolve(a, version=1)
        assert results[0] == (created, True)
        assert results[1] is None
        assert isinstance(results[2], EntryConflict) and results[2].index == 0
        assert isinstance(results[3], InvocationNotFound)
        assert results[4] == (created, False)
        done = attrs.evolve(stored, status=InvocationStatus.COMPLETED, version=2)
        assert results[5] == done
        assert isinstance(results[6], VersionConflict)
        assert results[7] is None
        assert [e.payload for e in backend.read_entries("batch-a")] == [b'"first"']
        assert backend.get_invocation("batch-b") == done
        assert [e.index for e in backend.read_entries("batch-b")] == [3]
        assert backend.write_batch([]) == []

    def test_batches_racing_record_one_value_per_index(
        self, clients: Callable[[], JournalBackend]
    ) -> None:
        first = clients()
        if not isinstance(first, BatchWriter):
            pytest.skip("this engine has no write_batch")
        inv, _ = first.create_invocation(make_invocation())
        workers = [clients() for _ in range(4)]

        def batch(i: int) -> list[object]:
            worker = workers[i % len(workers)]
            assert isinstance(worker, BatchWriter)
            return worker.write_batch(
                [AppendEntry(inv.id, make_entry(n, f'"{i}"'.encode())) for n in range(5)]
            )

        results = _race(self.race_threads, batch)
        for n in range(5):
            winners = [i for i, r in enumerate(results) if r[n] is None]
            assert len(winners) == 1, results
            losers = [r[n] for r in results if r[n] is not None]
            assert all(isinstance(e, EntryConflict) for e in losers)
            recorded = first.read_entries(inv.id, start=n)[0]
            assert recorded.payload == f'"{winners[0]}"'.encode()

    def test_a_closed_client_refuses_a_batch(self, open_backend: Opener) -> None:
        client = open_backend()
        client.close()
        if not isinstance(client, BatchWriter):
            pytest.skip("this engine has no write_batch")
        with pytest.raises(BackendUnavailable):
            client.write_batch([CreateInvocation(make_invocation())])

    # -- ids -----------------------------------------------------------------

    def test_awkward_ids_are_distinct_and_round_trip(self, backend: JournalBackend) -> None:
        for n, inv_id in enumerate(AWKWARD_IDS):
            backend.create_invocation(make_invocation(inv_id))
            backend.append_entry(inv_id, make_entry(0, str(n).encode()))
        for n, inv_id in enumerate(AWKWARD_IDS):
            stored = backend.get_invocation(inv_id)
            assert stored is not None and stored.id == inv_id
            assert [e.payload for e in backend.read_entries(inv_id)] == [str(n).encode()]
        assert sorted(AWKWARD_IDS) == sorted(backend.list_invocations())

    # -- listing -------------------------------------------------------------

    def test_list_by_status(self, backend: JournalBackend) -> None:
        ids = {s: [f"{s.value}-{n}" for n in range(3)] for s in InvocationStatus}
        for status, group in ids.items():
            for inv_id in group:
                stored, _ = backend.create_invocation(make_invocation(inv_id))
                if status is not InvocationStatus.PENDING:
                    backend.update_invocation(attrs.evolve(stored, status=status))
        for status, group in ids.items():
            assert list(backend.list_invocations(status)) == sorted(group)
        everything = sorted(i for group in ids.values() for i in group)
        assert list(backend.list_invocations()) == everything

    def test_list_follows_status_changes(self, backend: JournalBackend) -> None:
        stored, _ = backend.create_invocation(make_invocation("moving"))
        assert list(backend.list_invocations(InvocationStatus.PENDING)) == ["moving"]
        backend.update_invocation(attrs.evolve(stored, status=InvocationStatus.COMPLETED))
        assert list(backend.list_invocations(InvocationStatus.PENDING)) == []
        assert list(backend.list_invocations(InvocationStatus.COMPLETED)) == ["moving"]

    # -- delete --------------------------------------------------------------

    def test_delete_removes_invocation_and_entries(self, backend: JournalBackend) -> None:
        inv, _ = backend.create_invocation(make_invocation())
        backend.append_entry(inv.id, make_entry(0))
        assert backend.delete_invocation(inv.id) is True
        assert backend.get_invocation(inv.id) is None
        assert backend.read_entries(inv.id) == []
        assert inv.id not in list(backend.list_invocations())
        assert backend.delete_invocation(inv.id) is False
        again, created = backend.create_invocation(make_invocation(inv.id))
        assert created and again.version == 1
        backend.append_entry(inv.id, make_entry(0))

    # -- lifecycle -----------------------------------------------------------

    def test_closed_client_refuses_work(self, open_backend: Opener) -> None:
        client = open_backend()
        inv, _ = client.create_invocation(make_invocation())
        client.close()
        client.close()  # idempotent
        calls: list[Callable[[], Any]] = [
            lambda: client.create_invocation(make_invocation()),
            lambda: client.get_invocation(inv.id),
            lambda: client.update_invocation(inv),
            lambda: client.read_entries(inv.id),
            lambda: client.append_entry(inv.id, make_entry(0)),
            lambda: list(client.list_invocations()),
            lambda: client.delete_invocation(inv.id),
        ]
        for call in calls:
            with pytest.raises(BackendUnavailable):
                call()

    def test_reopen_sees_everything(self, open_backend: Opener) -> None:
        first = open_backend()
        if not first.capabilities.persistent:
            first.close()
            pytest.skip("engine is not persistent")
        inv, _ = first.create_invocation(make_invocation())
        first.append_entry(inv.id, make_entry(0))
        first.close()
        second = open_backend()
        try:
            assert second.get_invocation(inv.id) == inv
            assert [e.index for e in second.read_entries(inv.id)] == [0]
        finally:
            second.close()

    def test_two_clients_see_each_others_writes(
        self, clients: Callable[[], JournalBackend]
    ) -> None:
        a, b = clients(), clients()
        inv, _ = a.create_invocation(make_invocation())
        b.append_entry(inv.id, make_entry(0))
        assert [e.index for e in a.read_entries(inv.id)] == [0]
        assert b.get_invocation(inv.id) == inv

    # -- corruption ----------------------------------------------------------

    def test_corrupt_entry_raises_journal_corrupt(self, backend: JournalBackend) -> None:
        inv, _ = backend.create_invocation(make_invocation())
        backend.append_entry(inv.id, make_entry(0))
        self.corrupt_entry(backend, inv.id, 0)
        with pytest.raises(JournalCorrupt):
            backend.read_entries(inv.id)

    def test_corrupt_invocation_raises_journal_corrupt(self, backend: JournalBackend) -> None:
        inv, _ = backend.create_invocation(make_invocation())
        self.corrupt_invocation(backend, inv.id)
        with pytest.raises(JournalCorrupt):
            backend.get_invocation(inv.id)

    # -- model-based ---------------------------------------------------------

    def reference_backend(self) -> JournalBackend:
        """The engine this one is compared with in the state machine.

        By default :class:`ModelJournal`, a plain model of the protocol that
        shares no code with any engine (so the memory engine is checked too).
        """
        return ModelJournal()

    state_machine_settings = settings(
        max_examples=25,
        stateful_step_count=30,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )

    def test_behaves_like_the_reference(self, backend: JournalBackend) -> None:
        """A Hypothesis state machine runs the same calls on both engines."""
        run_state_machine_as_test(
            _model_machine(backend, self.reference_backend),
            settings=self.state_machine_settings,
        )


class ModelJournal:
    """The protocol's semantics in the fewest lines: the state machine's reference."""

    capabilities = Capabilities(persistent=False)

    def __init__(self) -> None:
        self.invocations: dict[str, Invocation] = {}
        self.entries: dict[str, dict[int, Entry]] = {}

    def create_invocation(self, invocation: Invocation) -> tuple[Invocation, bool]:
        if invocation.id in self.invocations:
            return self.invocations[invocation.id], False
        stored = self.invocations[invocation.id] = attrs.evolve(invocation, version=1)
        return stored, True

    def get_invocation(self, invocation_id: str) -> Invocation | None:
        return self.invocations.get(invocation_id)

    def update_invocation(self, invocation: Invocation) -> Invocation:
        current = self.invocations.get(invocation.id)
        if current is None:
            raise InvocationNotFound(invocation.id)
        if current.version != invocation.version:
            raise VersionConflict(invocation.id, invocation.version, current.version)
        stored = attrs.evolve(invocation, version=invocation.version + 1)
        self.invocations[invocation.id] = stored
        return stored

    def read_entries(self, invocation_id: str, start: int = 0) -> list[Entry]:
        slots = self.entries.get(invocation_id, {})
        return [slots[i] for i in sorted(slots) if i >= start]

    def append_entry(self, invocation_id: str, entry: Entry) -> None:
        if invocation_id not in self.invocations:
            raise InvocationNotFound(invocation_id)
        slots = self.entries.setdefault(invocation_id, {})
        if entry.index in slots:
            raise EntryConflict(invocation_id, entry.index)
        slots[entry.index] = entry

    def list_invocations(self, status: InvocationStatus | None = None) -> Iterator[str]:
        return iter(
            sorted(i for i, inv in self.invocations.items() if status in (None, inv.status))
        )

    def delete_invocation(self, invocation_id: str) -> bool:
        self.entries.pop(invocation_id, None)
        return self.invocations.pop(invocation_id, None) is not None

    def close(self) -> None:
        pass


def _outcome(call: Callable[[], Any]) -> Any:
    try:
        value = call()
    except JournalError as exc:
        return ("error", type(exc))
    return ("ok", list(value) if isinstance(value, Iterator) else value)


def _results(results: list[object]) -> list[object]:
    """Batch results compared by value, errors by type."""
    return [type(r) if isinstance(r, JournalError) else r for r in results]


def _model_machine(
    engine: JournalBackend, make_reference: Callable[[], JournalBackend]
) -> type[RuleBasedStateMachine]:
    """Build a state machine comparing ``engine`` with a fresh reference per example."""

    class Machine(RuleBasedStateMachine):
        ids = Bundle("ids")

        def __init__(self) -> None:
            super().__init__()
            # Each example works under its own prefix in the shared engine store.
            self.prefix = f"sm-{uuid.uuid4().hex[:8]}-"
            self.reference = make_reference()

        def both(self, call: Callable[[JournalBackend], Any]) -> Any:
            expected = _outcome(lambda: call(self.reference))
            actual = _outcome(lambda: call(engine))
            assert actual == expected
            return actual

        @rule(target=ids, name=st.sampled_from(["a", "b", "c/d", "é"]))
        def new_id(self, name: str) -> str:
            return self.prefix + name

        @rule(inv_id=ids, payload=st.binary(max_size=20))
        def create(self, inv_id: str, payload: bytes) -> None:
            inv = make_invocation(inv_id, input=payload, created_at=1.0, updated_at=1.0)
            self.both(lambda b: b.create_invocation(inv))

        @rule(inv_id=ids)
        def get(self, inv_id: str) -> None:
            self.both(lambda b: b.get_invocation(inv_id))

        @rule(
            inv_id=ids,
            status=st.sampled_from(list(InvocationStatus)),
            stale=st.booleans(),
            output=st.none() | st.binary(max_size=10),
        )
        def update(
            self, inv_id: str, status: InvocationStatus, stale: bool, output: bytes | None
        ) -> None:
            current = self.reference.get_invocation(inv_id)
            base = current or make_invocation(inv_id, created_at=1.0, updated_at=1.0)
            version = base.version - 1 if stale else base.version
            new = attrs.evolve(base, status=status, output=output, version=version)
            self.both(lambda b: b.update_invocation(new))

        @rule(
            inv_id=ids,
            index=st.integers(0, 6),
            payload=st.none() | st.binary(max_size=10),
            kind=st.sampled_from(list(EntryKind)),
        )
        def append(self, inv_id: str, index: int, payload: bytes | None, kind: EntryKind) -> None:
            entry = make_entry(index, payload, kind=kind, created_at=2.0)
            self.both(lambda b: b.append_entry(inv_id, entry))

        @rule(
            appends=st.lists(st.tuples(st.integers(0, 6), st.none() | st.binary(max_size=5))),
            inv_id=ids,
        )
        def batch(self, inv_id: str, appends: list[tuple[int, bytes | None]]) -> None:
            if not isinstance(engine, BatchWriter):
                return
            writes: list[Write] = [
                AppendEntry(inv_id, make_entry(index, payload, created_at=2.0))
                for index, payload in appends
            ]
            expected = _results(write_each(self.reference, writes))
            assert _results(engine.write_batch(writes)) == expected

        @rule(inv_id=ids, start=st.integers(0, 7))
        def read(self, inv_id: str, start: int) -> None:
            self.both(lambda b: b.read_entries(inv_id, start))

        @rule(status=st.none() | st.sampled_from(list(InvocationStatus)))
        def listing(self, status: InvocationStatus | None) -> None:
            def mine(b: JournalBackend) -> list[str]:
                return [i for i in b.list_invocations(status) if i.startswith(self.prefix)]

            self.both(mine)

        @rule(inv_id=ids)
        def delete(self, inv_id: str) -> None:
            self.both(lambda b: b.delete_invocation(inv_id))

        def teardown(self) -> None:
            self.reference.close()

    return Machine
