"""No import cycles between the modules of ``ossrl``, counting imports inside functions too (a lazy import that
closes a cycle is still a cycle: it only hides it until the function runs)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "ossrl"


def module_files() -> dict[str, Path]:
    """Every module of the package: dotted name -> file (a package is its ``__init__.py``)."""
    modules = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The ossrl modules ``name`` imports anywhere in its file. ``from package import x`` points at the submodule
    ``package.x`` when there is one, else at the package (x is then a name the package defines)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x / from ..y import z
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            for alias in node.names:
                found.add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source)
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def tangles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan): modules that import each other."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """A cycle through every tangle, as a path that starts and ends at the same module."""
    return [_cycle_in(graph, component) for component in tangles(graph)]


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first back to it)."""
    start = min(component)
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:  # back at the start: walk the parents from v
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [*reversed(path), start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle in component {component}")


def test_the_graph_sees_lazy_and_submodule_imports():
    graph = import_graph()
    assert "ossrl.kernels.moe" in graph["ossrl.model.gpt_oss"]  # from ossrl.kernels.moe import moe_experts
    assert "ossrl.kernels" in graph["ossrl.model.gpt_oss"]  # from ossrl.kernels import sink_attention (a name)
    assert "ossrl.harmony.tiny_tokenizer" in graph["ossrl.model.tiny"]  # imported inside a function
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_public_import_paths_still_work():
    """Other packages import these; moving code between kernel and model modules must keep them."""
    from ossrl.kernels import paged_decode_attention, sink_attention, triton_interpreting, warn_once  # noqa: F401
    from ossrl.kernels.decode_ref import paged_decode_attention as decode_entry
    from ossrl.kernels.decode_ref import triton_decode_problem  # noqa: F401
    from ossrl.kernels.moe import expert_path, grouped_matmul, moe_experts  # noqa: F401
    from ossrl.kernels.mxfp4_ref import mxfp4_grouped_matmul, mxfp4_kernel_works  # noqa: F401
    from ossrl.model import GptOss, GptOssConfig, MXFP4Weight, PackedBatch, pack_batch  # noqa: F401
    from ossrl.model.checkpoint import quantize_experts, resolve_checkpoint_dir  # noqa: F401
    from ossrl.model.mxfp4 import BLOCK, FP4_VALUES, dequantize_mxfp4, quantize_mxfp4  # noqa: F401

    assert decode_entry is paged_decode_attention
    assert callable(GptOss.from_pretrained) and callable(GptOss.save_pretrained)


def describe(graph: dict[str, set[str]], found: list[set[str]]) -> str:
    return "\n".join(f"{' -> '.join(_cycle_in(graph, c))}   (involved: {', '.join(sorted(c))})" for c in found)


def test_no_import_cycles_touch_the_model_or_the_kernels():
    graph = import_graph()
    found = [c for c in tangles(graph) if any(m.startswith(("ossrl.model", "ossrl.kernels")) for m in c)]
    assert not found, f"import cycles (lazy imports included):\n{describe(graph, found)}"


def test_no_import_cycles():
    graph = import_graph()
    found = tangles(graph)
    report = describe(graph, found)
    print(f"import cycles:\n{report}" if found else "no import cycles")
    assert not found, f"import cycles (lazy imports included):\n{report}"
