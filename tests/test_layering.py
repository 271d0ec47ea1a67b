"""The package's layering, read from the source with `ast` (no module is imported, torch is not needed).

    cli ─> pipeline ─> options, in_memory / streaming / parallel_build (variant steps) ─> verify, lowering,
           graph_capture, sampling_files, stages, artifact, backends, model, weights, quant, plan, ...
    graphs/, kernels/, autotune/, targets/  ─>  the shared core only: errors, spec, tokens, quant_format

Never: a lower layer importing the driver, a cycle (function-local imports count too: a cycle dodged by a local
import is still a cycle), or one module importing another's `_private` name.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# installed package name -> source folder (pyproject.toml's package-dir)
PACKAGES = {"qwen3export": ROOT / "qwen3export", "qwen3export.graphs": ROOT / "graphs",
            "qwen3export.kernels": ROOT / "kernels", "qwen3export.autotune": ROOT / "autotune",
            "qwen3export.targets": ROOT / "targets"}
LOWER = ("qwen3export.graphs", "qwen3export.kernels", "qwen3export.autotune", "qwen3export.targets")
SHARED_CORE = {"qwen3export", "qwen3export.errors", "qwen3export.spec", "qwen3export.tokens",
               "qwen3export.quant_format"}


def _modules() -> dict[str, Path]:
    mods = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            if package == "qwen3export" and parts and f"qwen3export.{parts[0]}" in PACKAGES:
                continue  # the side folders are their own packages
            mods[".".join([package, *parts])] = path
    return mods


MODULES = _modules()


def _imports(name: str) -> list[tuple[str, list[str], bool]]:
    """(imported module, names taken from it, top-level?) for every import statement of module `name`."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names = [a.name for a in node.names]
            subs = [n for n in names if f"{module}.{n}" in MODULES]  # `from . import search`: the submodule
            if subs:
                out += [(f"{module}.{n}", [], id(node) in top) for n in subs]
                names = [n for n in names if n not in subs]
            if names or not subs:
                out.append((module, names, id(node) in top))
    return out


def _edges() -> dict[str, set[str]]:
    graph = {}
    for name in MODULES:
        targets = set()
        for module, _, _ in _imports(name):
            while module and module not in MODULES:  # `import qwen3export.kernels.ops` names a module; a.b.c
                module = module.rpartition(".")[0]    # of a non-module c resolves to its module
            if module and module != name and not name.startswith(module + "."):  # a package's own __init__
                targets.add(module)
        graph[name] = targets
    return graph


def test_there_are_modules_to_check():
    assert {"qwen3export.pipeline", "qwen3export.options", "qwen3export.graphs.decoder",
            "qwen3export.kernels.fused_moe", "qwen3export.autotune.tune", "qwen3export.targets.registry"} <= set(MODULES)


def test_no_import_cycles():
    graph = _edges()
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles (function-local imports included): {cycles}"


def test_no_module_imports_another_modules_private_names():
    bad = [(name, module, n) for name in MODULES for module, names, _ in _imports(name)
           if module.startswith("qwen3export") and module != name for n in names
           if n.startswith("_") and not n.startswith("__")]
    assert not bad, bad


def test_lower_layers_import_only_the_shared_core():
    """graphs/, kernels/, autotune/, targets/ never import the driver (pipeline, options, verify, graph_capture,
    weights, plan, backends, cli, ...): only errors, spec, tokens and the quantization format."""
    bad = []
    for name in MODULES:
        if not name.startswith(LOWER):
            continue
        for module in _edges()[name]:
            if module.startswith("qwen3export") and not module.startswith(LOWER) and module not in SHARED_CORE:
                bad.append((name, module))
    assert not bad, bad


def test_shared_core_imports_no_driver():
    allowed = SHARED_CORE | {"qwen3export.graphs.rope"}  # spec normalises rope_scaling with the graph's own rules
    bad = [(name, m) for name in SHARED_CORE - {"qwen3export"} for m in _edges()[name]
           if m.startswith("qwen3export") and m not in allowed]
    assert not bad, bad


def test_package_init_imports_nothing_heavy():
    """`import qwen3export` (and so --help, targets, inspect, keys) stays light: the public API is lazy (PEP 562),
    and nothing the CLI, the artifact reader or the manifest imports at module level loads a HEAVY module."""
    for name in ("qwen3export", "qwen3export.cli", "qwen3export.describe", "qwen3export.artifact",
                 "qwen3export.errors", "qwen3export.manifest", "qwen3export.signing", "qwen3export.autotune.cli"):
        assert not _loads_heavy(name), name


# What a function-local import may defer: a heavy or optional third-party module (seconds or hundreds of ms to
# import, or absent on some machines), or a module of ours that loads one at import. Everything else is imported
# at module level, where a reader sees a module's dependencies in one place.
HEAVY = ("torch", "triton", "onnx", "onnx_ir", "onnxscript", "onnxruntime", "numpy", "optuna", "matplotlib",
         "tensorrt", "transformers", "safetensors.torch")


def _top_level_imports(name: str) -> set[str]:
    out = set()
    for module, _, top in _imports(name):
        if top:
            while module and module not in MODULES and module.split(".")[0] == "qwen3export":
                module = module.rpartition(".")[0]
            out.add(module)
    return out


def _loads_heavy(name: str, seen: frozenset = frozenset()) -> bool:
    """Whether importing module `name` imports a HEAVY module (its own top level, or a package module's)."""
    if name.startswith(tuple(h + "." for h in HEAVY)) or name in HEAVY:
        return True
    if name not in MODULES or name in seen:
        return False
    return any(_loads_heavy(m, seen | {name}) for m in _top_level_imports(name)
               | ({name.rpartition(".")[0]} if "." in name else set()))


def _node_imports(name: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The modules one import statement of module `name` names (relative imports resolved)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    base = package.split(".")[: len(package.split(".")) - (node.level - 1)] if node.level else []
    module = ".".join(base + ([node.module] if node.module else []))
    return [module] + [f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in MODULES]


def test_function_local_imports_defer_something_heavy_and_say_why():
    """A function-local import defers a HEAVY module, or one of ours that loads one, into a module that does not
    load it already; and it says why on its line or the line above (`# lazy: ...`). The CLI keeps --help, targets,
    inspect and keys free of torch this way; kernel_pack's GPU path and tensorrt's optional package too."""
    bad = []
    for name, path in MODULES.items():
        tree, lines = ast.parse(path.read_text()), path.read_text().split("\n")
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in top:
                continue
            if any(isinstance(p, ast.If) for p in tree.body if node in list(ast.walk(p))):
                continue  # `if TYPE_CHECKING:` blocks are module level
            said, i = "# lazy:" in lines[node.lineno - 1], node.lineno - 2
            while not said and i >= 0 and lines[i].strip().startswith(("#", "import ", "from ")):
                said, i = "# lazy:" in lines[i], i - 1  # a block of imports under one `# lazy:` comment
            heavy = any(_loads_heavy(m) for m in _node_imports(name, node))
            if not said:
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: no `# lazy:` reason")
            elif not heavy:
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: defers nothing heavy")
    assert not bad, "\n".join(bad)
