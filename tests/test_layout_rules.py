"""The package's layout rules, read from the source (ast): imports point down the layers, and transformers'
private names are touched only under `softprompt/hf/` (the seams to check on a transformers bump)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import softprompt

ROOT = Path(softprompt.__file__).parent

# Lowest first: a module may import its own layer and the layers before it, never one after it.
LAYERS = ["hf", "methods", "io", "core", "data", "inference", "train", "serve", "softprompt"]
# "softprompt": the top level (`cli.py`, `demo.py`, `__init__.py`, `__main__.py`), which may import anything.

# Private attributes of torch (not transformers) that code outside hf/ may touch.
TORCH_PRIVATES = {"_IncompatibleKeys", "_modules", "_version"}  # nn.Module._modules, Tensor._version


def modules() -> dict[str, ast.Module]:
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = ast.parse(path.read_text(), filename=str(path))
    return found


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (ROOT / parts[1]).is_dir()) else "softprompt"


def imported(module: str, tree: ast.Module) -> list[tuple[str, int]]:
    """(absolute module name, line) of every import of softprompt code in `module`, function-local ones too."""
    package = module if (ROOT.parent / module.replace(".", "/")).is_dir() else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            out.append((base, node.lineno))
            out += [(f"{base}.{a.name}", node.lineno) for a in node.names if _is_module(f"{base}.{a.name}")]
    return [(name, line) for name, line in out if name == "softprompt" or name.startswith("softprompt.")]


def _is_module(name: str) -> bool:
    path = ROOT.parent / name.replace(".", "/")
    return path.is_dir() or path.with_suffix(".py").is_file()


def test_every_module_has_a_layer():
    for name in modules():
        assert layer(name) in LAYERS, f"{name}: add its folder to LAYERS"


def test_imports_point_down():
    wrong = []
    for name, tree in modules().items():
        mine = LAYERS.index(layer(name))
        for target, line in imported(name, tree):
            # `from softprompt import X` takes X from the package's __init__, the top layer
            if LAYERS.index(layer(target)) > mine:
                wrong.append(f"{name}:{line} ({layer(name)}) imports {target} ({layer(target)})")
    assert not wrong, "imports that point up a layer:\n" + "\n".join(wrong)


def _transformers_privates(name: str, tree: ast.Module) -> set[str]:
    """Private names of transformers (and other libraries) that `tree` imports, reads, writes or overrides."""
    ours = _names_defined_here()
    found = set()
    transformers_bases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("transformers"):
            found |= {p for p in node.module.split(".") if p.startswith("_")}
            found |= {a.name for a in node.names if _private(a.name)}
            transformers_bases |= {a.asname or a.name: (node.module, a.name) for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {p for a in node.names if a.name.startswith("transformers") for p in a.name.split(".") if _private(p)}
        elif isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in ours:
            found.add(node.attr)
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "hasattr", "setattr"):
            text = node.args[1] if len(node.args) > 1 else None
            if isinstance(text, ast.Constant) and isinstance(text.value, str) and _private(text.value):
                found.add(text.value)
    for node in ast.walk(tree):  # methods that override a private method of a transformers base class
        if isinstance(node, ast.ClassDef):
            bases = [transformers_bases[b.id] for b in node.bases if isinstance(b, ast.Name) and b.id in transformers_bases]
            classes = [getattr(importlib.import_module(m), n) for m, n in bases]
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and _private(item.name):
                    if any(hasattr(c, item.name) for c in classes):
                        found.add(item.name)
    return found - TORCH_PRIVATES


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


_DEFINED: set[str] | None = None


def _names_defined_here() -> set[str]:
    """Every name softprompt itself defines (functions, classes, attributes it assigns): those are ours."""
    global _DEFINED
    if _DEFINED is None:
        _DEFINED = set()
        for tree in modules().values():
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    _DEFINED.add(node.name)
                elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                    _DEFINED.add(node.id)
                elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and _self(node.value):
                    _DEFINED.add(node.attr)
                elif isinstance(node, ast.arg):
                    _DEFINED.add(node.arg)
        # a private attribute softprompt sets on someone else's object is still someone else's name
        for tree in modules().values():
            for node in ast.walk(tree):
                if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and not _self(node.value):
                    _DEFINED.discard(node.attr)
    return _DEFINED


def _self(node: ast.AST) -> bool:
    return isinstance(node, ast.Name) and node.id in ("self", "cls")


def test_transformers_private_names_only_under_hf():
    wrong = []
    for name, tree in modules().items():
        if layer(name) == "hf":
            continue
        extra = _transformers_privates(name, tree)
        if extra:
            wrong.append(f"{name}: {sorted(extra)}")
    assert not wrong, "transformers' private names outside softprompt/hf/ (move the touch into hf/):\n" + "\n".join(wrong)


def test_the_seams_are_seen():
    """The scan finds the private touches that hf/ does hold (so an empty result elsewhere means something)."""
    seen = set().union(*(_transformers_privates(n, t) for n, t in modules().items() if layer(n) == "hf"))
    assert {"_can_checkpoint_with_cache", "_get_default_generation_params", "_local_mapping",
            "_get_output_dir", "_save_checkpoint"} <= seen, seen


def test_no_branch_on_a_methods_name_outside_the_method_files():
    """The centre asks each method what it needs (`learning_rate`, `prompt_in_vocabulary`, `placement`, ...)."""
    from softprompt.methods.config import methods

    names = {n for cls in methods().values() for n in (cls.method_name(), cls.peft_type)}
    classes = {cls.__name__ for cls in methods().values()}
    wrong = []
    for name, tree in modules().items():
        if layer(name) == "methods":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                sides += [e for s in sides if isinstance(s, (ast.Tuple, ast.List, ast.Set)) for e in s.elts]
                for side in sides:
                    if isinstance(side, ast.Constant) and side.value in names:
                        wrong.append(f"{name}:{node.lineno} compares with {side.value!r}")
            elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("isinstance", "issubclass"):
                kinds = node.args[1] if len(node.args) > 1 else None
                for kind in (kinds.elts if isinstance(kinds, ast.Tuple) else [kinds]):
                    if getattr(kind, "id", None) in classes:
                        wrong.append(f"{name}:{node.lineno} {node.func.id}(..., {kind.id})")
    assert not wrong, "branches on a method outside softprompt/methods/ (declare it on the method):\n" + "\n".join(wrong)


def test_only_the_public_names_import_a_method_file():
    """The centre works through the interface and the registry (`methods/adapter.py`, `methods/config.py`);
    only `softprompt/__init__.py` (peft's names) imports a method's own file (`methods/<method_name>.py`)."""
    from softprompt.methods.config import methods

    files = {f"softprompt.methods.{name}" for name in methods()}
    assert all(_is_module(f) for f in files), files
    wrong = [f"{name}:{line} imports {target}" for name, tree in modules().items()
             if layer(name) != "methods" and name != "softprompt"
             for target, line in imported(name, tree) if target in files]
    assert not wrong, "\n".join(wrong)


# transformers' cache and mask machinery, public or not, belongs to hf/ too.
SEAM_MODULES = ("transformers.cache_utils", "transformers.masking_utils", "transformers.modeling_layers")
SEAM_NAMES = {"Cache", "DynamicCache", "StaticCache", "CacheLayerMixin", "DynamicLayer", "GradientCheckpointingLayer"}


def _seam_touches(tree: ast.Module) -> set[str]:
    touched = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("transformers"):
            touched |= {node.module} & set(SEAM_MODULES) | {a.name for a in node.names} & SEAM_NAMES
    return touched


def test_transformers_cache_and_masks_only_under_hf():
    wrong = {name: sorted(_seam_touches(tree)) for name, tree in modules().items() if layer(name) != "hf"}
    wrong = {name: names for name, names in wrong.items() if names}
    assert not wrong, f"transformers' cache or mask API outside softprompt/hf/: {wrong}"
    seen = set().union(*(_seam_touches(t) for n, t in modules().items() if layer(n) == "hf"))
    assert {"Cache", "CacheLayerMixin", "DynamicCache", "GradientCheckpointingLayer"} <= seen, seen  # the scan sees them
