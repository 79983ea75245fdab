"""The code an `LGQPipeline` folder carries, so that diffusers' generic loader builds it without this repository:

    pipe = DiffusionPipeline.from_pretrained(folder_or_hub_id, trust_remote_code=True)

diffusers' convention for custom pipelines (``model_index.json``: ``"_class_name": [module, class]``, the module's
``.py`` file at the folder's root, component ``[module, class]`` entries with ``<component>/<module>.py``) is
followed; how its remote-code loader (``diffusers.utils.dynamic_modules_utils``) reads files shapes the layout:

* ``lgq_<package>_<module>.py`` at the root: each module the pipeline needs (``pipelines.pipeline_lgq`` and what
  it imports from ``tokenizer``, ``prior`` and ``common``, found by walking their imports), flattened to one
  folder with its project imports made relative (``from prior.gpt import GPTPrior`` ->
  ``from .lgq_prior_gpt import GPTPrior``): diffusers copies a remote module's relative imports beside it, one
  folder level deep;
* ``pipeline_lgq.py`` at the root, the entry named by ``_class_name``: imports every bundled module directly
  (for a local folder diffusers copies only the files the entry imports itself, not what those import) and
  registers itself in ``sys.modules`` as ``lgq_remote_code``;
* ``<component>/lgq_component.py`` in each component folder: returns the entry's classes from
  ``sys.modules["lgq_remote_code"]``. A component file may not import relatively (for a hub id diffusers
  downloads a component folder's weights, configs and entry file only), and the pipeline checks its
  components' types, so the components' classes must be the very classes the pipeline module imported; the
  pipeline's entry is always loaded before its components.

``LGQPipeline.save_pretrained`` writes all of it; ``LGQPipeline.from_pretrained`` (this repository's classes)
ignores it and reads the components' class names only.
"""
from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from pipelines.pipeline_lgq import COMPONENT_CLASSES  # class name -> class; the entry exports these names

ENTRY_MODULE = "pipeline_lgq"            # <folder>/pipeline_lgq.py, model_index.json "_class_name"[0]
COMPONENT_MODULE = "lgq_component"       # <folder>/<component>/lgq_component.py
REGISTERED_NAME = "lgq_remote_code"      # sys.modules name of the loaded entry module
ROOT_MODULES = ("pipelines.pipeline_lgq",)
PROJECT_PACKAGES = ("common", "tokenizer", "prior", "pipelines")
# what bundled code may import at module level: the Python standard library and what diffusers itself needs
ALLOWED_EXTERNAL = {"torch", "numpy", "diffusers", "transformers", "huggingface_hub", "safetensors", "PIL",
                    "filelock"}  # filelock: a dependency of diffusers and huggingface_hub
PIPELINE_CLASS = "LGQPipeline"
REPO_ROOT = Path(__file__).resolve().parents[1]
_REGISTRY_STRING = re.compile(r"^([A-Za-z_][\w.]*):(\w+)$")  # "tokenizer.quantizers.lgq:LGQuantizer"


def flat_name(module: str) -> str:
    """``prior.gpt`` -> ``lgq_prior_gpt`` (a package's ``__init__`` keeps the package's name)."""
    return "lgq_" + module.replace(".", "_")


def is_project_module(module: str) -> bool:
    return module.split(".")[0] in PROJECT_PACKAGES


def module_source_file(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ImportError(f"cannot find the source of {module!r} to bundle")
    return Path(spec.origin)


def _is_lazy(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """True for an import inside a function or a try block (optional at run time)."""
    node = parents.get(node)
    while node is not None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Try)):
            return True
        node = parents.get(node)
    return False


@dataclass
class BundledModule:
    name: str           # dotted name in this repository
    source: str         # rewritten source (relative imports of the other bundled modules)
    imports: set[str]   # project modules it imports


def bundle_module(module: str) -> BundledModule:
    """Read ``module``'s source and rewrite its project imports and ``"pkg.mod:Class"`` registry strings to the
    flat bundle names. ValueError for import forms diffusers' loader cannot follow and for module-level imports
    of packages a diffusers user may not have."""
    path = module_source_file(module)
    text = path.read_text()
    tree = ast.parse(text, filename=str(path))
    parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
    lines = text.splitlines(keepends=True)
    imports: set[str] = set()
    edits: list[tuple[int, int, int, str]] = []  # (line, start col, end col, replacement) on one line
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and is_project_module(node.module or ""):
            for alias in node.names:
                if _is_package(node.module) and importlib.util.find_spec(f"{node.module}.{alias.name}") is not None:
                    raise ValueError(f"{path}:{node.lineno}: 'from {node.module} import {alias.name}' imports a "
                                     f"module; import names from {node.module}.{alias.name} instead")
            imports.add(node.module)
            line = lines[node.lineno - 1]
            match = re.compile(rf"from\s+{re.escape(node.module)}\s+import").search(line, node.col_offset)
            if match is None:
                raise ValueError(f"{path}:{node.lineno}: cannot rewrite this import (keep 'from X import' on one line)")
            edits.append((node.lineno, match.start(), match.end(), f"from .{flat_name(node.module)} import"))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if is_project_module(alias.name):
                    raise ValueError(f"{path}:{node.lineno}: 'import {alias.name}': use 'from {alias.name} import ...'")
                _check_external(alias.name, node, parents, path)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            _check_external(node.module or "", node, parents, path)
        elif isinstance(node, ast.ImportFrom):
            raise ValueError(f"{path}:{node.lineno}: relative import; the project imports absolutely")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            match = _REGISTRY_STRING.match(node.value)
            if match and is_project_module(match.group(1)) and importlib.util.find_spec(match.group(1)):
                imports.add(match.group(1))
                old = repr(node.value)
                line = lines[node.lineno - 1]
                start = line.find(old, node.col_offset) if node.lineno == node.end_lineno else -1
                if start < 0:
                    old = old.replace("'", '"')
                    start = line.find(old, node.col_offset)
                if start < 0:
                    raise ValueError(f"{path}:{node.lineno}: cannot rewrite the string {node.value!r}")
                edits.append((node.lineno, start, start + len(old),
                              repr(f".{flat_name(match.group(1))}:{match.group(2)}")))
    for lineno, start, end, replacement in sorted(edits, reverse=True):
        line = lines[lineno - 1]
        lines[lineno - 1] = line[:start] + replacement + line[end:]
    header = (f"# Bundled by lgq (pipelines/remote_code.py) from {module} for diffusers' remote-code loader; "
              f"edit the repository's file, not this one.\n")
    return BundledModule(name=module, source=header + "".join(lines), imports=imports)


def _is_package(module: str) -> bool:
    return module_source_file(module).name == "__init__.py"


def _check_external(module: str, node: ast.AST, parents, path: Path) -> None:
    top = module.split(".")[0]
    if top in sys.stdlib_module_names or top in ALLOWED_EXTERNAL or top == "__future__" or _is_lazy(node, parents):
        return
    raise ValueError(f"{path}:{node.lineno}: module-level import of {module!r}, which a diffusers user may not have "
                     f"installed; import it inside the function that needs it")


def collect_bundle(roots: tuple[str, ...] = ROOT_MODULES) -> dict[str, BundledModule]:
    """Every project module reachable from ``roots`` through imports (and registry strings), rewritten."""
    bundle: dict[str, BundledModule] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in bundle:
            continue
        bundle[name] = bundle_module(name)
        todo.extend(sorted(bundle[name].imports - set(bundle)))
    return dict(sorted(bundle.items()))


def entry_source(bundle: dict[str, BundledModule]) -> str:
    imports = "\n".join(f"from .{flat_name(name)} import __name__ as _{flat_name(name)}  # noqa: F401"
                        for name in bundle)
    classes = "\n".join(f"from .{flat_name(_defining_module(bundle, cls))} import {cls}"
                        for cls in (PIPELINE_CLASS, *COMPONENT_CLASSES))
    return f'''"""Entry of this LGQPipeline folder for diffusers' remote-code loader (written by lgq's pipelines/remote_code.py).

    pipe = DiffusionPipeline.from_pretrained(folder_or_hub_id, trust_remote_code=True)

Every bundled module is imported here by name: for a local folder diffusers copies only the files its entry
imports directly. The components' lgq_component.py files take their classes from this module, registered in
sys.modules as {REGISTERED_NAME!r}.
"""
import sys

{imports}

{classes}

sys.modules[{REGISTERED_NAME!r}] = sys.modules[__name__]

__all__ = {[PIPELINE_CLASS, *COMPONENT_CLASSES]!r}
'''


def component_source() -> str:
    assignments = "\n".join(f"{name} = _entry.{name}" for name in COMPONENT_CLASSES)
    return f'''"""A component of an LGQPipeline folder for diffusers' remote-code loader (written by lgq's pipelines/remote_code.py).

Its classes are the ones the pipeline's code (../{ENTRY_MODULE}.py) imported, so the pipeline accepts the
component: diffusers loads that entry before the components, and it registers itself as {REGISTERED_NAME!r}.
"""
import sys

if {REGISTERED_NAME!r} not in sys.modules:
    raise ImportError("load the whole pipeline (DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)); "
                      "this component's class is defined by the pipeline's code, {ENTRY_MODULE}.py at the folder's root")
_entry = sys.modules[{REGISTERED_NAME!r}]
{assignments}

__all__ = {list(COMPONENT_CLASSES)!r}
'''


def _defining_module(bundle: dict[str, BundledModule], class_name: str) -> str:
    for name, module in bundle.items():
        if re.search(rf"^class {class_name}\b", module.source, flags=re.MULTILINE):
            return name
    raise ValueError(f"no bundled module defines {class_name}")


def write_remote_code(folder: str | os.PathLike) -> list[Path]:
    """Write the bundle, the entry and the component files into a saved pipeline folder and point its
    ``model_index.json`` at them. Returns the files written."""
    folder = Path(folder)
    index_file = folder / "model_index.json"
    index = json.loads(index_file.read_text())
    bundle = collect_bundle()
    written = []
    for name, module in bundle.items():
        written.append(folder / f"{flat_name(name)}.py")
        written[-1].write_text(module.source)
    written.append(folder / f"{ENTRY_MODULE}.py")
    written[-1].write_text(entry_source(bundle))
    index["_class_name"] = [ENTRY_MODULE, PIPELINE_CLASS]
    for component, entry in index.items():
        if component.startswith("_") or not isinstance(entry, list) or entry[0] is None:
            continue
        if entry[1] not in COMPONENT_CLASSES:
            raise ValueError(f"component {component!r} is a {entry[1]}, which the bundled code does not define")
        index[component] = [COMPONENT_MODULE, entry[1]]
        written.append(folder / component / f"{COMPONENT_MODULE}.py")
        written[-1].write_text(component_source())
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return written


__all__ = ["write_remote_code", "collect_bundle", "bundle_module", "flat_name", "ENTRY_MODULE", "COMPONENT_MODULE",
           "REGISTERED_NAME"]
