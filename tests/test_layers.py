"""Layers (DESIGN.md §1, docs/design.md): the import graph points down only.

    scripts -> workers -> integrations -> the package facade (shmalloc/__init__)
            -> the layers on the core (mbuf, buffer, default) -> the core -> ipc

A module imports modules of its own layer or of layers below it, at module level:
an import inside a function (a way to dodge a cycle) is refused, but for the
integrations and the optional packages, which only some installs have.  Nothing
above the core touches an arena's private views (``_core``); workers and scripts
not even the layers' entry to them (``layers.views``).  ``import shmalloc`` imports
no engine, and the core install needs no extra."""

import ast
import pathlib
import subprocess
import sys

import pytest

from shmalloc import Arena

ROOT = pathlib.Path(__file__).resolve().parent.parent
ENGINES = ("dask", "distributed", "ray")
# the installed package of each top-level folder (pyproject's package-dir)
FOLDERS = {"ipc": "shmalloc.ipc", "shmalloc": "shmalloc", "workers": "shmalloc.workers",
           "scripts": "shmalloc.scripts"}
IPC, CORE, LAYER, FACADE, INTEGRATION, WORKERS, SCRIPTS = range(7)
LAYER_NAMES = ("ipc", "core", "layer on the core", "package facade", "integration",
               "workers", "scripts")
LAYERS_ON_THE_CORE = ("shmalloc.mbuf", "shmalloc.buffer", "shmalloc._export",
                      "shmalloc.default")


def layer_of(module: str) -> int:
    if module.startswith("shmalloc.ipc"):
        return IPC
    if module.startswith("shmalloc.workers"):
        return WORKERS
    if module.startswith("shmalloc.scripts"):
        return SCRIPTS
    if module.startswith("shmalloc.integrations"):
        return INTEGRATION
    if module == "shmalloc":
        return FACADE
    if module.startswith(LAYERS_ON_THE_CORE):
        return LAYER
    return CORE


def _modules():
    for folder, pkg in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts
                     if p != "__init__"]
            yield ".".join([pkg, *parts]), path


MODULES = dict(_modules())


def _targets(module: str, path: pathlib.Path, node) -> list[str]:
    """The project modules an import statement names (absolute)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "shmalloc"]
    base = node.module or ""
    if node.level:
        parts = module.split(".")
        if path.name != "__init__.py":
            parts = parts[:-1]
        parts = parts[:len(parts) - (node.level - 1)]
        base = ".".join(parts + ([base] if base else []))
    if base.split(".")[0] != "shmalloc":
        return []
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def _trees():
    for module, path in MODULES.items():
        yield module, path, ast.parse(path.read_text(), str(path))


def test_imports_point_down():
    bad = []
    for module, path, tree in _trees():
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _targets(module, path, node):
                    a, b = layer_of(module), layer_of(target)
                    if b > a:
                        bad.append(f"{path.relative_to(ROOT)}:{node.lineno} {module} "
                                   f"({LAYER_NAMES[a]}) imports {target} ({LAYER_NAMES[b]})")
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_no_project_import_inside_a_function():
    """Module-level imports only (the integrations, which need an optional engine,
    may be imported where they are used)."""
    bad = []
    for module, path, tree in _trees():
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)) and any(
                        layer_of(t) != INTEGRATION for t in _targets(module, path, node)):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} in {fn.name}()")
    assert not bad, "project imports inside functions:\n" + "\n".join(bad)


def test_the_core_names_no_layer_above_it_even_by_string():
    """No core module names a module above the core in a string (an importlib call,
    a subprocess command): what the core runs of the layers comes from registration
    (``shmalloc.layers``) or from names stored in the arena's data (hooks)."""
    bad = []
    for module, path, tree in _trees():
        if layer_of(module) != CORE:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for above in ("shmalloc.mbuf", "shmalloc.buffer", "shmalloc.workers",
                              "shmalloc.scripts", "shmalloc.integrations"):
                    if node.value.startswith(above) and not _in_docstring(tree, node):
                        bad.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}")
    assert not bad, "the core names layers above it:\n" + "\n".join(bad)


def _in_docstring(tree, node) -> bool:
    for owner in ast.walk(tree):
        if isinstance(owner, (ast.Module, ast.ClassDef, ast.FunctionDef)) and owner.body:
            first = owner.body[0]
            if isinstance(first, ast.Expr) and first.value is node:
                return True
    return False


def test_nothing_above_the_core_uses_the_private_views():
    """``_core`` is the core's; the layers on it go through ``layers.views(arena)``,
    workers and scripts through the public API only."""
    bad = []
    for module, path, tree in _trees():
        layer = layer_of(module)
        if layer in (IPC, CORE):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "_core":
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} ._core")
            elif layer >= WORKERS and isinstance(node, ast.Name) and node.id == "views":
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} views()")
    assert not bad, "private views used above the core:\n" + "\n".join(bad)


def test_layers_extend_the_arena_but_never_replace_it():
    """``Arena.extend`` gives the facade the layers' methods and refuses a name the
    core (or another module) defines."""
    assert Arena.netstat_m.__module__ == "shmalloc.mbuf.stats"
    assert Arena.alloc.__module__ == "shmalloc.buffer"

    def send(arena):                                  # a name the core defines
        return None

    with pytest.raises(AttributeError, match="already defined"):
        Arena.extend(send)
    assert Arena.send.__module__ == "shmalloc.handoff"


@pytest.mark.slow
def test_import_shmalloc_imports_no_engine():
    code = ("import sys, numpy, shmalloc, shmalloc.buffer\n"
            "a = shmalloc.Arena.create_local(4 << 20)\n"
            "x = a.ndarray(10)\n"
            "del x\n"
            "a.destroy()\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {ENGINES!r}))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout


def test_no_core_module_imports_an_integration_or_an_engine():
    for d in ("shmalloc", "ipc", "workers"):
        for path in (ROOT / d).rglob("*.py"):
            if "integrations" in path.parts:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [node.module or ""]
                else:
                    continue
                for name in names:
                    assert "integrations" not in name, f"{path} imports {name}"
                    assert name.split(".")[0] not in ENGINES, f"{path} imports {name}"


# The optional dependencies (extras test, dask, ray, plot, and the benchmark's peers):
# none may be imported when a module of the core install is imported.
OPTIONAL = ("numpy", "dask", "distributed", "ray", "matplotlib", "faster_fifo", "pytest",
            "hypothesis")


@pytest.mark.slow
def test_the_core_install_needs_no_extra():
    """``pip install shmalloc`` has posix_ipc, msgpack and psutil only: every module but
    the integrations imports, the command line builds, and an arena works, with every
    optional package refused (as on a machine without them)."""
    modules = sorted(
        ".".join(["shmalloc" if d == "shmalloc" else f"shmalloc.{d}",
                  *p.relative_to(ROOT / d).with_suffix("").parts]).replace(".__init__", "")
        for d in ("shmalloc", "ipc", "workers", "scripts")
        for p in (ROOT / d).rglob("*.py")
        if "integrations" not in p.parts and p.name != "__main__.py")
    code = (
        "import importlib, importlib.abc, sys\n"
        f"OPTIONAL = {OPTIONAL!r}\n"
        "class Refuse(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in OPTIONAL:\n"
        "            raise ImportError(f'{name} is not installed (test)')\n"
        "sys.meta_path.insert(0, Refuse())\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        "from shmalloc.scripts import cli\n"
        "cli._parser()\n"
        "import shmalloc\n"
        "a = shmalloc.Arena.create_local(4 << 20)\n"
        "with a.alloc(100) as b:\n"
        "    b[:5] = b'hello'\n"
        "a.netstat_m(); a.check(); a.destroy()\n"
        "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("ok"), r.stdout
