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
