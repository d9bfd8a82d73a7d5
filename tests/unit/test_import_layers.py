"""One-way layers: every import in the core and the apps points down this table (or stays on its level).

level  modules                                   why there
 0     quant/*, architectures, atomic, jsonio,   pure math and helpers (torch, files, a pipeline call, argument
       metrics, evaluation, checks, layer_spec,  checks, accelerate device maps, single-file key layouts), and the
       device_maps, text_encoders, single_file,  plan entry type, releasing mapped checkpoint pages: no other
       load_memory                              module of this package
 1     kernels/*                                 integer GEMMs and fused quantizers; need only quant and LayerSpec
 2     nn                                        ViDiTQLinear, the quantized layer; runs on the kernels
 3     footprint, timestep_clock, lora, roles,   read or extend ViDiTQLinear layers, name a model's layers (roles,
       reference_mixed_precision, fuse_qkv       the paper's W8 rule for w4a8_mp), fuse q/k/v layers into one
 4     calibration                               activation statistics; its default layers come from architectures
 5     plan                                      the per-layer decisions; reads CalibrationStats
 6     recipe                                    smoothing / rotation per layer; decides plan entries
 7     convert                                   model surgery: builds the planned layers
 8     config, checkpoint                        the diffusers-facing config; reading checkpoint files
 9     hub                                       atomic save, model card, push; knows a model by its ViDiTQConfig
10     diffusers_quantizer,                      diffusers' from_pretrained hook; runs convert, attaches hub;
       transformers_quantizer                    transformers' (text encoders), on the same plan and layers
11     api                                       quantize(model, config): the quantizer's result for a loaded model
12     cli, mixed_precision/*, recipe_refine,    built on all of the above: searches, the command line, the test
       testing/*, the package __init__           models, the public names
13     comfyui_nodes/*, gradio_app/*             the apps: user interfaces on top of the core

Imports inside functions count like the ones at the top of a file (they only defer the cycle, they do not remove
it), and so do the package `__init__` files Python runs on the way to a submodule. The core never imports ComfyUI,
Gradio or the apps: `viditq demo --ui` starts the Gradio app as its own process. A new module needs a row here.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ROOTS = ("viditq_diffusers", "comfyui_nodes", "gradio_app")
CORE = "viditq_diffusers"

# module prefix -> level; the longest matching prefix wins (see the table in the docstring)
LEVELS = {
    "viditq_diffusers.quant": 0, "viditq_diffusers.architectures": 0, "viditq_diffusers.atomic": 0,
    "viditq_diffusers.jsonio": 0, "viditq_diffusers.metrics": 0, "viditq_diffusers.evaluation": 0,
    "viditq_diffusers.layer_spec": 0, "viditq_diffusers.checks": 0, "viditq_diffusers.device_maps": 0,
    "viditq_diffusers.text_encoders": 0, "viditq_diffusers.single_file": 0, "viditq_diffusers.load_memory": 0,
    "viditq_diffusers.kernels": 1,
    "viditq_diffusers.nn": 2,
    "viditq_diffusers.footprint": 3, "viditq_diffusers.timestep_clock": 3, "viditq_diffusers.lora": 3,
    "viditq_diffusers.roles": 3, "viditq_diffusers.reference_mixed_precision": 3, "viditq_diffusers.fuse_qkv": 3,
    "viditq_diffusers.calibration": 4,
    "viditq_diffusers.plan": 5,
    "viditq_diffusers.recipe": 6,
    "viditq_diffusers.convert": 7,
    "viditq_diffusers.config": 8, "viditq_diffusers.checkpoint": 8,
    "viditq_diffusers.hub": 9,
    "viditq_diffusers.diffusers_quantizer": 10, "viditq_diffusers.transformers_quantizer": 10,
    "viditq_diffusers.api": 11,
    "viditq_diffusers": 12,  # the package __init__ (the public names)
    "viditq_diffusers.cli": 12, "viditq_diffusers.mixed_precision": 12, "viditq_diffusers.recipe_refine": 12,
    "viditq_diffusers.testing": 12,
    "comfyui_nodes": 13, "gradio_app": 13,
}
# top-level names the core must never import: ComfyUI (`comfy`, `comfy_api`, its `folder_paths` and `nodes`),
# Gradio, the apps and the harness that starts them for tests and benchmarks
FORBIDDEN_IN_CORE = {"comfy", "comfy_api", "folder_paths", "nodes", "gradio", "comfyui_nodes", "gradio_app", "harness"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def source_files() -> dict[str, Path]:
    return {module_name(p): p for root in ROOTS for p in sorted((REPO / root).rglob("*.py"))}


def called_name(call: ast.Call) -> str | None:
    return getattr(call.func, "attr", getattr(call.func, "id", None))


def imported_names(path: Path, modules: dict[str, Path]) -> list[tuple[int, str]]:
    """(line, dotted module) for every import in `path`, at any depth, relative ones resolved; `from X import y`
    gives `X.y` when that is a module of ours, else `X`. `importlib.import_module("...")` counts too."""
    name = module_name(path)
    package = name if is_package(path) else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                found.append((node.lineno, sub if sub in modules else source))
        elif isinstance(node, ast.Call) and called_name(node) == "import_module" and node.args \
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            found.append((node.lineno, node.args[0].value))
    return found


def executed_modules(importer: str, target: str, modules: dict[str, Path]) -> list[str]:
    """`target` and the package inits Python runs to reach it (not the importer's own packages, which are running
    already)."""
    parts = target.split(".")
    chain = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return [m for m in chain if m in modules and not (importer == m or importer.startswith(m + "."))]


def level_of(module: str) -> int | None:
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in LEVELS:
            return LEVELS[".".join(parts[:i])]
    return None


def import_edges() -> list[tuple[str, int, str, str]]:
    """(importer, line, imported module as written, executed module of ours) for every internal import."""
    modules = source_files()
    edges = []
    for importer, path in modules.items():
        for line, target in imported_names(path, modules):
            edges += [(importer, line, target, m) for m in executed_modules(importer, target, modules)]
    return edges


def where(importer: str, line: int) -> str:
    return f"{source_files()[importer].relative_to(REPO)}:{line}"


def test_every_module_has_a_level():
    missing = sorted(m for m in source_files() if level_of(m) is None)
    assert not missing, f"modules without a level (add them to LEVELS and the docstring's table): {missing}"


def test_imports_only_go_down():
    upward = [
        f"{where(importer, line)}: {importer} (level {level_of(importer)}) imports {module} "
        f"(level {level_of(module)})"
        + ("" if module == target else f" on the way to {target}")
        for importer, line, target, module in import_edges() if level_of(module) > level_of(importer)
    ]
    assert not upward, "imports that go up a layer (move the code down, or the import up):\n" + "\n".join(upward)


def test_no_import_cycles():
    """Modules on one level may import each other, but never in a circle."""
    graph: dict[str, set[str]] = {}
    for importer, _, _, module in import_edges():
        graph.setdefault(importer, set()).add(module)
    done, path = set(), []

    def visit(module):
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(module):] + [module]))
        if module in done:
            return
        path.append(module)
        for target in sorted(graph.get(module, ())):
            visit(target)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_core_never_imports_comfy_gradio_or_the_apps():
    modules = source_files()
    offenders = [
        f"{where(importer, line)}: {importer} imports {target}"
        for importer, path in modules.items() if importer.split(".")[0] == CORE
        for line, target in imported_names(path, modules) if target.split(".")[0] in FORBIDDEN_IN_CORE
    ]
    assert not offenders, "the core imports an app or a UI framework:\n" + "\n".join(offenders)
