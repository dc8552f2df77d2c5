"""gift_fast's import graph: no cycle between modules, and no module imports from a layer above it.

Every ``import`` / ``from ... import`` in gift_fast (and in kernels/, installed as
gift_fast.kernels) counts, including those inside functions: a function-level import is still a
dependency, only a later one. Importing ``gift_fast.a.b`` also runs the package ``gift_fast.a``'s
``__init__``, so it depends on that package too (except on the packages the importer itself is
in, which Python has already started). The layers, lowest first; a module may import from its
own layer or a lower one. A module is in the layer of its longest declared prefix (by dotted
components), so ``gift_fast.losses`` covers both a module and a package of that name.
"""
from __future__ import annotations

import ast
import pathlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

ROOT = pathlib.Path(__file__).resolve().parent.parent

LAYERS: List[Tuple[str, Tuple[str, ...]]] = [
    ("kernels", ("gift_fast.kernels",)),
    # plain-torch input checks and sequence layouts, used by the backends and everything above
    ("validation and sequences", ("gift_fast.validation", "gift_fast.sequences")),
    ("backends", ("gift_fast.backends",)),
    ("distributed primitives", ("gift_fast.distributed",)),
    ("op", ("gift_fast.logprobs",)),
    # ``gift_fast`` itself (exactly): the public facade re-exporting the op and the losses
    ("losses", ("gift_fast.losses", "gift_fast.functional", "gift_fast.modules", "gift_fast")),
    ("adapters, integrations and tools", ("gift_fast.integrations", "gift_fast.compile_targets",
                                          "gift_fast.native_build")),
    ("train", ("gift_fast.train",)),
    ("cli", ("gift_fast.cli",)),
]
SOURCES = ((ROOT / "gift_fast", "gift_fast"), (ROOT / "kernels", "gift_fast.kernels"))


@dataclass(frozen=True)
class Import:
    importer: str
    target: str
    where: str          # file:line
    statement: str

    def __str__(self) -> str:
        return f"{self.where}: `{self.statement}` ({self.importer} -> {self.target})"


def layer_of(module: str) -> Optional[int]:
    """Index into LAYERS of the longest declared prefix of ``module``; the bare ``gift_fast``
    prefix matches only the package itself."""
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            matches = module == prefix or (prefix != "gift_fast" and
                                           module.startswith(prefix + "."))
            if matches and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    return best


def modules_on_disk() -> Dict[str, Tuple[str, bool, str]]:
    """``name -> (source, is_package, path relative to the repository)``."""
    out = {}
    for base, package in SOURCES:
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            out[".".join([package] + parts)] = (path.read_text(encoding="utf-8"), is_package,
                                                str(path.relative_to(ROOT)))
    return out


def imports(modules: Dict[str, Tuple[str, bool, str]]) -> List[Import]:
    """Every import of a gift_fast module by a gift_fast module (with the packages it runs)."""
    found = []
    for name, (source, is_package, path) in modules.items():
        package = name if is_package else name.rpartition(".")[0]
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source, path)):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(base + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                # ``from pkg import sub`` imports the submodule when there is one
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                           for a in node.names]
            else:
                continue
            statement = " ".join(lines[node.lineno - 1].split())
            for target in targets:
                if not (target == "gift_fast" or target.startswith("gift_fast.")):
                    continue
                while target not in modules and "." in target:   # `import pkg.mod.attr`
                    target = target.rpartition(".")[0]
                # the packages whose __init__ runs first, unless the importer is already in them
                parts = target.split(".")
                runs = [".".join(parts[:i]) for i in range(2, len(parts))] + [target]
                for t in runs:
                    if t != name and not name.startswith(t + "."):
                        found.append(Import(name, t, f"{path}:{node.lineno}", statement))
    return found


def upward_imports(found: List[Import]) -> List[str]:
    problems = []
    for imp in found:
        low, high = layer_of(imp.importer), layer_of(imp.target)
        for module, layer in ((imp.importer, low), (imp.target, high)):
            if layer is None:
                problems.append(f"{module} has no declared layer (add its prefix to LAYERS in "
                                f"tests/test_layering.py); seen at {imp}")
        if low is not None and high is not None and high > low:
            problems.append(f"{imp}: layer '{LAYERS[low][0]}' imports from layer "
                            f"'{LAYERS[high][0]}', above it")
    return sorted(set(problems))


def cycles(found: List[Import]) -> List[str]:
    """One message per strongly connected component of more than one module (or a self-import),
    naming a cycle in it and the import statements that close it."""
    graph: Dict[str, Dict[str, Import]] = {}
    for imp in found:
        graph.setdefault(imp.importer, {}).setdefault(imp.target, imp)
        graph.setdefault(imp.target, {})
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def strongconnect(v):       # Tarjan; the graph has a few dozen nodes
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strongconnect(w)
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
            if len(component) > 1 or v in graph[v]:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    messages = []
    for component in components:
        members, start = set(component), component[0]
        # the shortest cycle through the component's first module (breadth-first inside it)
        parent, frontier = {start: None}, [start]
        while start not in [w for v in frontier for w in graph[v]]:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v]):
                    if w in members and w not in parent:
                        parent[w] = v
                        nxt.append(w)
            frontier = nxt
        last = next(v for v in frontier if start in graph[v])
        path = [last]
        while parent[path[-1]] is not None:
            path.append(parent[path[-1]])
        path = path[::-1] + [start]
        steps = "\n  ".join(str(graph[a][b]) for a, b in zip(path, path[1:]))
        messages.append(f"import cycle among {', '.join(component)}:\n  {steps}")
    return messages


def test_every_module_has_a_layer_and_imports_only_downwards():
    problems = upward_imports(imports(modules_on_disk()))
    assert not problems, "\n".join(problems)


def test_no_import_cycle():
    problems = cycles(imports(modules_on_disk()))
    assert not problems, "\n".join(problems)


def test_the_checks_see_function_level_imports_package_inits_and_cycles():
    """The checker itself, on made-up modules: each planted fault is found and named."""
    fake = {
        "gift_fast.logprobs": ("def f():\n    from .train import trainer\n", False,
                               "gift_fast/logprobs.py"),
        "gift_fast.train": ("", True, "gift_fast/train/__init__.py"),
        "gift_fast.train.trainer": ("from . import study\n", False, "gift_fast/train/trainer.py"),
        "gift_fast.train.study": ("def g():\n    from .trainer import x\n", False,
                                  "gift_fast/train/study.py"),
        "gift_fast.functional": ("from .distributed.data_parallel import gather\n", False,
                                 "gift_fast/functional.py"),
        "gift_fast.distributed": ("from gift_fast.integrations.fsdp import FusedLossModel\n", True,
                                  "gift_fast/distributed/__init__.py"),
        "gift_fast.distributed.data_parallel": ("", False, "gift_fast/distributed/data_parallel.py"),
        "gift_fast.integrations": ("", True, "gift_fast/integrations/__init__.py"),
        "gift_fast.integrations.fsdp": ("", False, "gift_fast/integrations/fsdp.py"),
        "gift_fast.mystery": ("import gift_fast.validation\n", False, "gift_fast/mystery.py"),
        "gift_fast.validation": ("", False, "gift_fast/validation.py"),
    }
    found = imports(fake)
    upward = "\n".join(upward_imports(found))
    # a function-level import from a higher layer, with its file, line and statement
    assert ("gift_fast/logprobs.py:2: `from .train import trainer` (gift_fast.logprobs -> "
            "gift_fast.train.trainer): layer 'op' imports from layer 'train'") in upward, upward
    # the package __init__ that an import runs: distributed/__init__ pulls in an adapter
    assert ("gift_fast/distributed/__init__.py:1: `from gift_fast.integrations.fsdp import "
            "FusedLossModel` (gift_fast.distributed -> gift_fast.integrations.fsdp)") in upward
    assert "gift_fast.mystery has no declared layer" in upward
    assert not any("functional.py" in line and "above" in line for line in upward.splitlines())
    cycle = "\n".join(cycles(found))
    assert "import cycle among gift_fast.train.study, gift_fast.train.trainer" in cycle, cycle
    assert "gift_fast/train/study.py:2: `from .trainer import x`" in cycle, cycle
    assert "gift_fast/train/trainer.py:1: `from . import study`" in cycle, cycle
    assert layer_of("gift_fast.losses.gift") == layer_of("gift_fast.losses") == \
        layer_of("gift_fast.functional") == layer_of("gift_fast")
    assert layer_of("gift_fast.lossesx") is None
