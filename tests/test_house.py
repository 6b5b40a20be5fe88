"""Repository hygiene that CI enforces: the ruff config passes, and pytest refuses unknown markers."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_check_passes():
    pytest.importorskip("ruff", reason="ruff is in requirements-dev.txt")
    from ruff.__main__ import find_ruff_bin

    r = subprocess.run([find_ruff_bin(), "check", "--no-cache", str(ROOT)], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def test_unknown_marker_is_an_error(tmp_path):
    test = tmp_path / "test_marker.py"
    test.write_text(textwrap.dedent(
        """
        import pytest

        @pytest.mark.gpuu  # a typo of a registered marker
        def test_x():
            pass
        """))
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(tmp_path),
                        str(test), "-q"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert r.returncode != 0 and "'gpuu' not found in `markers`" in r.stdout + r.stderr, r.stdout[-2000:]


def _package_imports(rel_path: str) -> set[str]:
    """Dotted names of the d2l_fast modules a package file imports anywhere (module level or inside functions)."""
    import ast

    path = ROOT / "d2l_fast" / rel_path
    pkg = ["d2l_fast", *Path(rel_path).parent.parts]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
                names = [mod] if node.module else [f"{mod}.{a.name}" for a in node.names]
            else:
                names = [node.module or ""]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out.update(n for n in names if n == "d2l_fast" or n.startswith("d2l_fast."))
    return out


def test_imports_point_down():
    # the spec depends on nothing in the package; the Hugging Face helpers only on the spec (and its error type)
    assert _package_imports("config.py") == set()
    assert _package_imports("hf.py") <= {"d2l_fast.config", "d2l_fast.checkpoint"}
    assert not _package_imports("checkpoint.py") & {"d2l_fast.hf", "d2l_fast.encoder", "d2l_fast.patching",
                                                    "d2l_fast.model"}
    # patching and the encoder are siblings over hf: neither imports the other, nor anything above them
    above = {"d2l_fast.model", "d2l_fast.compat", "d2l_fast.config"}
    assert not _package_imports("patching.py") & (above | {"d2l_fast.encoder"})
    assert not _package_imports("encoder.py") & (above | {"d2l_fast.patching"})


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """d2l_fast module → the d2l_fast modules it imports, at module level or inside functions. ``from .pkg import
    name`` counts as an import of ``pkg.name`` when that is a module, else of ``pkg``; the parent packages Python
    initialises on the way are not edges (every module would otherwise depend on d2l_fast/__init__.py)."""
    files = {_module_name(p): p for p in (ROOT / "d2l_fast").rglob("*.py")}
    graph = {}
    for mod, path in files.items():
        deps = set()
        for name in _package_imports(str(path.relative_to(ROOT / "d2l_fast"))):
            while name not in files and "." in name:  # an imported attribute: the module that defines it
                name = name.rsplit(".", 1)[0]
            if name in files and name != mod:
                deps.add(name)
        graph[mod] = deps
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as [a, b, ..., a], or None."""
    state, stack = {}, []  # state: 1 on the current path, 2 done

    def visit(node):
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_find_cycle_reports_a_cycle():  # the checker below can fail
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycles():
    graph = _import_graph()
    assert {"d2l_fast", "d2l_fast.model", "d2l_fast.kernels.segmented_lora"} <= graph.keys()
    assert "d2l_fast.adapters" in graph["d2l_fast.model"]
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 120  # @triton.jit kernels are exempt: one kernel is one GPU program


def _oversized(root: Path) -> list[str]:
    import ast

    out = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        rel = path.relative_to(root.parent)
        if (n := len(text.splitlines())) > MAX_MODULE_LINES:
            out.append(f"{rel}: {n} lines (max {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if any("jit" in ast.unparse(d) for d in node.decorator_list):
                    continue
                if (n := node.end_lineno - node.lineno + 1) > MAX_FUNCTION_LINES:
                    out.append(f"{rel}:{node.lineno} {node.name}: {n} lines (max {MAX_FUNCTION_LINES})")
    return out


def test_modules_and_functions_stay_small():
    assert _oversized(ROOT / "d2l_fast") == []


def test_size_check_can_fail(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES + 1))
    (pkg / "big.py").write_text("def f():\n" + body + "\n")
    found = _oversized(pkg)
    assert len(found) == 1 and "big.py:1 f:" in found[0]
