"""Choosing an engine by URL: the registry, its errors, lazy imports and entry points."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import os
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Iterator
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any, ClassVar

import pytest

import runjournal.backends as backends
from runjournal.backends import (
    DEFAULT_URL,
    ENTRY_POINT_GROUP,
    MemoryBackend,
    _registry,
    available_schemes,
    open_backend,
    register_backend,
)
from runjournal.context import Runtime
from runjournal.journal import JournalBackend

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def clean_registry() -> Iterator[None]:
    _registry._reset()
    yield
    _registry._reset()


class Spy:
    """An engine that records how it was opened."""

    calls: ClassVar[list[tuple[str, dict[str, Any]]]] = []

    @classmethod
    def from_url(cls, url: str, **options: Any) -> JournalBackend:
        cls.calls.append((url, options))
        return MemoryBackend()


class Strict:
    """An engine whose from_url names the options it takes."""

    @classmethod
    def from_url(cls, url: str, *, timeout: str = "1", mode: str = "rw") -> JournalBackend:
        return MemoryBackend()


@pytest.fixture
def spy() -> type[Spy]:
    Spy.calls = []
    register_backend("spy", Spy)
    return Spy


def run_python(code: str, *, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (so sys.modules starts clean)."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=60,
        check=False,
    )


# -- lazy imports ---------------------------------------------------------------


def test_importing_runjournal_loads_no_engine_sdk_and_reads_no_entry_points() -> None:
    result = run_python(
        """
        import importlib.metadata, sys
        reads = []
        real = importlib.metadata.entry_points
        def counting(**kw):
            reads.append(kw)
            return real(**kw)
        importlib.metadata.entry_points = counting

        import runjournal
        from runjournal import Runtime, open_backend
        import runjournal.backends as backends
        import runjournal.context as context
        heavy = sorted(m for m in ("lmdb", "boto3", "botocore") if m in sys.modules)
        print("after import:", heavy, len(reads))
        backends.open_backend("memory://").close()
        heavy = sorted(m for m in ("lmdb", "boto3", "botocore") if m in sys.modules)
        print("after memory://:", heavy, len(reads))
        try:
            backends.open_backend("nosuchscheme://x")
        except ValueError:
            pass
        print("after unknown:", len(reads))
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "after import: [] 0",
        "after memory://: [] 0",
        "after unknown: 1",
    ]


# -- opening by URL -------------------------------------------------------------


def test_query_parameters_become_options_and_keywords_override(spy: type[Spy]) -> None:
    open_backend("SPY://host/some/path?a=1&b=&c=x%20y", b="kw")
    assert spy.calls == [("SPY://host/some/path", {"a": "1", "b": "kw", "c": "x y"})]
    open_backend("spy:///abs/path")
    open_backend("spy://")
    assert [url for url, _ in spy.calls[1:]] == ["spy:///abs/path", "spy://"]


def test_a_mapping_configures_url_and_options(spy: type[Spy]) -> None:
    open_backend({"url": "spy://x?a=query&b=query", "options": {"b": "mapping", "c": 3}}, c=4)
    assert spy.calls == [("spy://x", {"a": "query", "b": "mapping", "c": 4})]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"options": {}}, "needs a 'url' key"),
        ({"url": "spy://", "option": {}}, "unknown key.*option.*expected 'url' and 'options'"),
        ({"url": "spy://", "options": ["a"]}, "'options'.*must be a mapping"),
        ({"url": 42}, "'url'.*must be a str"),
    ],
)
def test_bad_mappings_are_refused(spy: type[Spy], config: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        open_backend(config)
    assert spy.calls == []


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("/var/lib/journal", "has no scheme"),
        ("lmdb:relative", "has no scheme"),
        ("spy:///a#b", "#fragment"),
        ("spy://x?a=1&a=2", "sets the option 'a' twice"),
    ],
)
def test_malformed_urls_are_refused(spy: type[Spy], url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        open_backend(url)
    assert spy.calls == []


def test_a_url_must_be_a_string() -> None:
    with pytest.raises(TypeError, match="must be a str or a mapping, got bytes"):
        open_backend(b"memory://")  # type: ignore[arg-type]


def test_runjournal_url_is_used_when_no_url_is_given(
    spy: type[Spy], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RUNJOURNAL_URL", " spy://from-env?x=1 ")
    open_backend(y=2)
    assert spy.calls == [("spy://from-env", {"x": "1", "y": 2})]


def test_a_bad_runjournal_url_says_where_it_came_from(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNJOURNAL_URL", "not-a-url")
    with pytest.raises(ValueError, match=r"\$RUNJOURNAL_URL 'not-a-url' has no scheme"):
        open_backend()


def test_without_runjournal_url_the_default_is_lmdb(
    spy: type[Spy], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RUNJOURNAL_URL", raising=False)
    register_backend("lmdb", Spy, replace=True)
    open_backend()
    assert DEFAULT_URL == "lmdb://.runjournal"
    assert spy.calls == [("lmdb://.runjournal", {})]


def test_runtime_without_a_backend_opens_runjournal_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNJOURNAL_URL", "memory://registry-test")
    with Runtime() as rt:
        assert isinstance(rt.backend, MemoryBackend)
        assert rt.backend.store is MemoryBackend.from_url("memory://registry-test").store


# -- registration ---------------------------------------------------------------


def test_register_a_class_then_open_it_by_url(spy: type[Spy]) -> None:
    backend = open_backend("spy://a")
    assert isinstance(backend, MemoryBackend)
    assert spy.calls == [("spy://a", {})]
    assert "spy" in available_schemes()


def test_register_a_dotted_path_imports_it_on_first_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "rj_lazy_engine.py").write_text(
        "from runjournal.backends import MemoryBackend\n"
        "class Outer:\n"
        "    class Engine(MemoryBackend):\n"
        "        @classmethod\n"
        "        def from_url(cls, url):\n"
        "            return cls()\n"
    )
    monkeypatch.syspath_prepend(tmp_path)
    monkeypatch.delitem(sys.modules, "rj_lazy_engine", raising=False)
    register_backend("lazy", "rj_lazy_engine:Outer.Engine")
    register_backend("lazy2", "rj_lazy_engine.Outer")
    assert "rj_lazy_engine" not in sys.modules
    backend = open_backend("lazy://")
    assert type(backend).__qualname__ == "Outer.Engine"
    with pytest.raises(TypeError, match=r"lazy2:// engine 'rj_lazy_engine.Outer'.*no from_url"):
        open_backend("lazy2://")


def test_a_registered_scheme_is_not_silently_replaced(spy: type[Spy]) -> None:
    with pytest.raises(ValueError, match=r"'spy' is already registered \(register_backend\(\)\)"):
        register_backend("Spy", Strict)
    with pytest.raises(ValueError, match=r"'memory' is already registered \(built-in\)"):
        register_backend("memory", Spy)
    register_backend("spy", Strict, replace=True)
    open_backend("spy://")
    assert spy.calls == []


@pytest.mark.parametrize("scheme", ["", "1abc", "a_b", "a b", "é", "a:b"])
def test_invalid_schemes_are_refused(scheme: str) -> None:
    with pytest.raises(ValueError, match="invalid URL scheme"):
        register_backend(scheme, Spy)


def test_registering_something_that_is_not_an_engine_is_refused() -> None:
    with pytest.raises(TypeError, match="has no from_url"):
        register_backend("thing", object)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not a dotted path"):
        register_backend("thing", "no_attribute_named:")
    assert "thing" not in available_schemes()


def test_a_dotted_path_to_a_missing_attribute_says_so(tmp_path: Path) -> None:
    register_backend("ghost", "runjournal.backends._memory:GhostBackend")
    with pytest.raises(
        ImportError, match=r"'runjournal.backends._memory' has no attribute 'GhostBackend'"
    ):
        open_backend("ghost://")


# -- errors ---------------------------------------------------------------------


def test_unknown_scheme_lists_the_known_ones(spy: type[Spy]) -> None:
    with pytest.raises(ValueError, match="unknown journal URL scheme 'redis'") as info:
        open_backend("redis://localhost/0")
    assert "known schemes: lmdb, memory, s3, spy" in str(info.value)
    assert ENTRY_POINT_GROUP in str(info.value)


def test_an_option_the_engine_does_not_take_is_named_with_the_engine() -> None:
    register_backend("strict", Strict)
    with pytest.raises(TypeError) as info:
        open_backend("strict://x?timeout=3&colour=red")
    message = str(info.value)
    assert "strict://" in message and "Strict" in message
    assert "'colour'" in message and "'timeout'" not in message
    assert "it takes: timeout, mode" in message
    assert isinstance(open_backend("strict://x", timeout="3", mode="ro"), MemoryBackend)


def test_builtin_engines_options_are_checked_like_any_engines() -> None:
    with pytest.raises(TypeError, match=r"memory:// engine .* 'colour'; it takes: no options"):
        open_backend("memory://", colour="red")
    with pytest.raises(TypeError, match=r"lmdb:// engine .* 'colour'; it takes: map_size"):
        open_backend("lmdb://x", colour="red")


def _fake_builtin(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, module_source: str, extra: str = "fake"
) -> None:
    (tmp_path / "rj_fake_engine.py").write_text(module_source)
    monkeypatch.syspath_prepend(tmp_path)
    monkeypatch.delitem(sys.modules, "rj_fake_engine", raising=False)
    monkeypatch.setitem(_registry._BUILTINS, "fake", ("rj_fake_engine:FakeBackend", extra))
    _registry._reset()


def test_a_builtin_whose_sdk_is_missing_says_which_extra_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _fake_builtin(monkeypatch, tmp_path, "import rj_sdk_that_is_not_installed\n")
    with pytest.raises(ImportError, match=r"pip install 'runjournal\[fake\]'") as info:
        open_backend("fake://x")
    assert "fake://" in str(info.value)
    cause = info.value.__cause__
    assert isinstance(cause, ModuleNotFoundError)
    assert cause.name == "rj_sdk_that_is_not_installed"


def test_a_builtin_failing_on_its_own_code_is_not_blamed_on_the_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _fake_builtin(monkeypatch, tmp_path, "from runjournal.journal import NoSuchName\n")
    with pytest.raises(ImportError, match="cannot import the fake:// engine") as info:
        open_backend("fake://x")
    assert "pip install" not in str(info.value)
    assert isinstance(info.value.__cause__, ImportError)


_BLOCK_SDK = """
import sys
from importlib.abc import MetaPathFinder

class Block(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == {sdk!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, Block())
for name in list(sys.modules):
    if name.partition(".")[0] == {sdk!r}:
        del sys.modules[name]

import runjournal.backends as backends
try:
    backends.open_backend({url!r})
except ImportError as exc:
    print(type(exc).__name__, "|", exc, "|", type(exc.__cause__).__name__, exc.__cause__.name)
else:
    print("opened")
"""


@pytest.mark.parametrize(
    ("scheme", "url", "sdk"),
    [("lmdb", "lmdb:///tmp/never-created-journal", "lmdb"), ("s3", "s3://bucket/prefix", "boto3")],
)
def test_the_builtin_engines_name_their_extra_when_the_sdk_is_missing(
    scheme: str, url: str, sdk: str
) -> None:
    if importlib.util.find_spec(f"runjournal.backends.{scheme}") is None:
        pytest.skip(f"backends/{scheme}.py is not in this tree yet")
    result = run_python(_BLOCK_SDK.format(sdk=sdk, url=url))
    assert result.returncode == 0, result.stderr
    kind, message, cause = (part.strip() for part in result.stdout.split("|"))
    assert kind == "ImportError"
    assert f"pip install 'runjournal[{scheme}]'" in message
    assert cause == f"ModuleNotFoundError {sdk}"


# -- entry points ---------------------------------------------------------------


def _entry_points(*eps: EntryPoint) -> Any:
    calls: list[str] = []

    def fake(*, group: str) -> list[EntryPoint]:
        calls.append(group)
        return [ep for ep in eps if ep.group == group]

    fake.calls = calls  # type: ignore[attr-defined]
    return fake


def _ep(name: str, value: str) -> EntryPoint:
    return EntryPoint(name=name, value=value, group=ENTRY_POINT_GROUP)


def test_entry_points_are_read_once_and_only_for_an_unknown_scheme(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "rj_ep_engine.py").write_text(
        "from runjournal.backends import MemoryBackend\n"
        "class Engine(MemoryBackend):\n"
        "    @classmethod\n"
        "    def from_url(cls, url):\n"
        "        return cls()\n"
    )
    monkeypatch.syspath_prepend(tmp_path)
    monkeypatch.delitem(sys.modules, "rj_ep_engine", raising=False)
    fake = _entry_points(_ep("viaep", "rj_ep_engine:Engine"))
    monkeypatch.setattr(_registry, "entry_points", fake)
    open_backend("memory://").close()
    assert fake.calls == []
    assert type(open_backend("viaep://")).__module__ == "rj_ep_engine"
    with pytest.raises(ValueError, match="known schemes: lmdb, memory, s3, viaep"):
        open_backend("other://")
    assert fake.calls == [ENTRY_POINT_GROUP]


def test_builtins_and_explicit_registrations_win_over_entry_points(
    spy: type[Spy], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = _entry_points(
        _ep("spy", "rj_not_importable:Engine"), _ep("memory", "rj_not_importable:Engine")
    )
    monkeypatch.setattr(_registry, "entry_points", fake)
    assert "spy" in available_schemes()
    open_backend("spy://")
    assert isinstance(open_backend("memory://"), MemoryBackend)
    assert spy.calls == [("spy://", {})]


def test_register_backend_may_take_over_a_scheme_an_entry_point_provides(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_registry, "entry_points", _entry_points(_ep("ep", "rj_nowhere:Engine")))
    assert "ep" in available_schemes()
    Spy.calls = []
    register_backend("ep", Spy)
    open_backend("ep://")
    assert Spy.calls == [("ep://", {})]


def test_odd_entry_points_are_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _entry_points(
        _ep("bad_name", "x:Y"), _ep("dup", "first:Engine"), _ep("dup", "second:Engine")
    )
    monkeypatch.setattr(_registry, "entry_points", fake)
    with pytest.warns(RuntimeWarning) as record:
        schemes = available_schemes()
    messages = sorted(str(w.message) for w in record)
    assert len(messages) == 2
    assert "'first:Engine'" in messages[1] and "'second:Engine'" in messages[1]
    assert "named 'bad_name': not a valid URL scheme" in messages[0]
    assert "dup" in schemes and "bad_name" not in schemes
    with pytest.raises(ImportError, match=r"cannot import the dup:// engine 'first:Engine'"):
        open_backend("dup://")


def _write_wheel(directory: Path, name: str, files: dict[str, str]) -> Path:
    """A minimal pure-Python wheel, so installing it needs no build backend."""
    dist_info = f"{name}-0.1.dist-info"
    files = {
        **files,
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n",
        f"{dist_info}/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: runjournal-tests\nRoot-Is-Purelib: true\n"
            "Tag: py3-none-any\n"
        ),
    }
    record = []
    wheel = directory / f"{name}-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            data = text.encode()
            archive.writestr(path, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            record.append(f"{path},sha256={digest.decode()},{len(data)}")
        record.append(f"{dist_info}/RECORD,,")
        archive.writestr(f"{dist_info}/RECORD", "\n".join(record) + "\n")
    return wheel


def test_an_engine_installed_with_an_entry_point_is_found_by_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wheel = _write_wheel(
        tmp_path,
        "rj_toy_engine",
        {
            "rj_toy_engine.py": textwrap.dedent(
                """
                from runjournal.backends import MemoryBackend

                class ToyBackend(MemoryBackend):
                    opened_with = None

                    @classmethod
                    def from_url(cls, url, *, flavour="plain"):
                        engine = cls()
                        engine.opened_with = (url, flavour)
                        return engine
                """
            ),
            "rj_toy_engine-0.1.dist-info/entry_points.txt": (
                f"[{ENTRY_POINT_GROUP}]\ntoy = rj_toy_engine:ToyBackend\n"
            ),
        },
    )
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
         "--disable-pip-version-check", "--target", str(target), str(wheel)],
        check=True,
        timeout=120,
    )  # fmt: skip
    assert (target / "rj_toy_engine-0.1.dist-info" / "entry_points.txt").is_file()

    with pytest.raises(ValueError, match="unknown journal URL scheme 'toy'"):
        open_backend("toy://before-install")

    monkeypatch.syspath_prepend(target)
    monkeypatch.delitem(sys.modules, "rj_toy_engine", raising=False)
    _registry._reset()
    try:
        assert "toy" in available_schemes()
        assert "rj_toy_engine" not in sys.modules
        backend = open_backend("toy://somewhere?flavour=spicy")
        assert type(backend).__name__ == "ToyBackend"
        assert backend.opened_with == ("toy://somewhere", "spicy")  # type: ignore[attr-defined]
        with pytest.raises(TypeError, match=r"toy://.*'colour'.*it takes: flavour"):
            open_backend("toy://x", colour="red")
    finally:
        sys.modules.pop("rj_toy_engine", None)


def test_backends_exports_the_registry() -> None:
    assert set(backends.__all__) >= {
        "MemoryBackend",
        "available_schemes",
        "open_backend",
        "register_backend",
    }
    assert backends.__all__ == sorted(backends.__all__)
