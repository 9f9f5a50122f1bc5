"""Layers: the integrations sit on top.  ``import shmalloc`` (Buffers and numpy
included) imports no engine, and no module of the core (``shmalloc`` but its
``integrations``, ``ipc``, ``workers``) imports an integration or an engine; only
``scripts`` (the benchmark) may, on demand."""

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
ENGINES = ("dask", "distributed", "ray")


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
