"""The layout docs/architecture.md describes, held against the code: imports run one way (commands on top,
models at the bottom), no cycles, no module imports a command, shared code never tests a task's name."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "mae"
# the commands: every mae module behind a console script of pyproject.toml (`mae-x = "mae.x:cli"`)
COMMANDS = set(re.findall(r'^[\w-]+ = "mae\.(\w+):cli"', (ROOT / "pyproject.toml").read_text(), re.M))


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = p.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


MODULES = _modules()


def _imports(name: str) -> set[str]:
    """The package modules `name` imports, anywhere in the file (functions included)."""
    path, found = MODULES[name], set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for t in targets:
            while t and t not in MODULES:
                t = t.rpartition(".")[0]
            if t and t not in (name, "mae"):
                found.add(t)
    return found


GRAPH = {m: _imports(m) for m in MODULES}


def test_no_import_cycles():
    seen, done, cycles = set(), set(), []

    def visit(m, path):
        if m in done:
            return
        if m in seen:
            cycles.append(path[path.index(m) :] + [m])
            return
        seen.add(m)
        for n in sorted(GRAPH[m]):
            visit(n, path + [m])
        done.add(m)

    for m in MODULES:
        visit(m, [])
    assert cycles == []


def test_no_module_imports_a_command_and_commands_stay_flat_and_few():
    commands = {f"mae.{c}" for c in COMMANDS}
    assert commands >= {"mae.pretrain", "mae.segment", "mae.embed"} and commands <= set(MODULES)
    assert [(m, n) for m in MODULES for n in GRAPH[m] if n in commands] == []
    flat = {p.stem for p in PKG.glob("*.py") if p.stem != "__init__" and p.stem not in COMMANDS}
    assert len(flat) <= 4, flat  # config, cli and a couple more; the machinery lives in folders


# what each room may import (besides itself); docs/architecture.md, "Import direction"
MAY_IMPORT = {
    "mae.config": set(),
    "mae.models": set(),
    "mae.data": {"mae.config"},
    "mae.runs": {"mae.config"},
    "mae.eval": {"mae.config", "mae.data", "mae.models", "mae.runs"},
    "mae.weights": {"mae.config", "mae.data", "mae.models", "mae.runs", "mae.device"},
    "mae.train": {
        "mae.config",
        "mae.data",
        "mae.models",
        "mae.runs",
        "mae.device",
        "mae.weights",
        "mae.eval",
    },
}


def _room(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2])


@pytest.mark.parametrize("room", sorted(MAY_IMPORT))
def test_imports_run_down(room):
    """A room imports only the rooms below it; models/ and config import nothing of the package."""
    bad = [
        (m, n)
        for m in MODULES
        if _room(m) == room
        for n in GRAPH[m]
        if _room(n) != room and _room(n) not in MAY_IMPORT[room]
    ]
    assert bad == []


def test_shared_code_never_tests_a_task_name():
    pattern = re.compile(r"""\btask\s*[!=]=\s*["']|\.task\s*[!=]=""")
    offenders = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in MODULES.values()
        if "tasks" not in p.relative_to(PKG).parts
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []


def test_every_task_declares_its_keys_beside_build_task_and_loads_without_torch():
    code = (
        "import sys, mae.tasks as t\n"
        "assert all(callable(t.task_module(n).build_task) and t.READS[n] for n in t.TASKS)\n"
        "print(sorted(m for m in ('torch', 'accelerate', 'wandb') if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
