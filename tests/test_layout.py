"""The shape of the distribution: one import name, layering, no private names across modules."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "runjournal"
LAYERS = ("journal", "backends", "context")
# What each layer may import of runjournal's (besides itself).
ALLOWED = {"journal": set(), "backends": {"journal"}, "context": {"journal"}}


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _ours(node: ast.Import | ast.ImportFrom) -> list[str]:
    """The runjournal modules an import statement names."""
    if isinstance(node, ast.ImportFrom):
        if node.level:
            return ["runjournal.<relative>"]
        names = [node.module or ""]
    else:
        names = [alias.name for alias in node.names]
    return [n for n in names if n == "runjournal" or n.startswith("runjournal.")]


def test_each_layer_imports_only_what_the_design_allows() -> None:
    bad = []
    for path in _modules():
        parts = path.relative_to(ROOT).with_suffix("").parts
        if len(parts) < 3 or parts[1] not in LAYERS:
            continue  # runjournal/__init__, the CLI, the demo and the plugin sit at the edge
        layer = parts[1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for name in _ours(node):
                target = name.split(".")[1] if name.count(".") else ""
                if target != layer and target not in ALLOWED[layer]:
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {name}")
    assert not bad, "\n".join(bad)


def _private_reads(path: Path) -> list[str]:
    """``obj._name`` where obj is not self/cls, and ``from m import _name``."""
    found = []
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            if node.attr.startswith("__") and node.attr.endswith("__"):
                continue
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue
            if (
                isinstance(owner, ast.Name)
                and owner.id in ("os", "sys")
                and node.attr
                in (
                    "_exit",
                    "_getframe",
                )
            ):
                continue
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} reads .{node.attr}")
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {alias.name}")
    return found


def test_no_module_reads_a_private_name_of_another_object() -> None:
    bad = [line for path in _modules() for line in _private_reads(path)]
    assert not bad, "\n".join(bad)


def test_the_private_name_check_can_fail(tmp_path: Path) -> None:
    sample = PACKAGE / "_layout_sample_for_test.py"
    sample.write_text("from x import _hidden\n\ndef f(other):\n    return other._state\n")
    try:
        found = _private_reads(sample)
    finally:
        sample.unlink()
    assert [line.split(" ", 1)[1] for line in found] == ["imports _hidden", "reads ._state"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
         "--disable-pip-version-check", "--wheel-dir", str(out), str(ROOT)],
        check=True,
        timeout=300,
        capture_output=True,
    )  # fmt: skip
    [built] = out.glob("runjournal-*.whl")
    return built


def test_the_wheel_has_exactly_one_top_level_name(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"runjournal"}
    assert "runjournal/py.typed" in names
    [top_level] = [n for n in names if n.endswith(".dist-info/top_level.txt")] or [None]
    if top_level is not None:
        with zipfile.ZipFile(wheel) as zf:
            assert zf.read(top_level).decode().split() == ["runjournal"]


def test_a_user_project_with_its_own_context_journal_and_backends_runs_pytest(
    tmp_path: Path,
) -> None:
    """The v1 layout broke this: runjournal's top-level `context` shadowed the user's."""
    project = tmp_path / "shop"
    (project / "journal").mkdir(parents=True)
    (project / "journal" / "__init__.py").write_text("LEDGER = 'the shop journal'\n")
    (project / "context.py").write_text("GREETING = 'the shop context'\n")
    (project / "backends.py").write_text("NAMES = ['the shop backends']\n")
    (project / "test_shop.py").write_text(
        textwrap.dedent(
            """
            import backends
            import context
            import journal

            from runjournal import Context, Runtime


            def test_own_modules_win():
                assert context.GREETING == "the shop context"
                assert journal.LEDGER == "the shop journal"
                assert backends.NAMES == ["the shop backends"]


            def test_runjournal_works_beside_them(runjournal_runtime):
                @runjournal_runtime.handler("h")
                def h(ctx: Context, x):
                    return ctx.run(lambda: x + 1, name="inc")

                assert runjournal_runtime.invoke("h", 1) == 2
                assert isinstance(runjournal_runtime, Runtime)
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(project)],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 passed" in done.stdout


def test_the_package_exports_the_users_api() -> None:
    import runjournal

    assert {
        "Runtime",
        "Context",
        "RunOptions",
        "RunFuture",
        "TerminalError",
        "NonDeterminismError",
        "open_backend",
        "register_backend",
    } <= set(runjournal.__all__)
    assert runjournal.__all__ == sorted(runjournal.__all__)
    for name in runjournal.__all__:
        assert getattr(runjournal, name) is not None
