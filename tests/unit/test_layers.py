"""The layers go one way: fsm (pure) <- events (adapters) <- the agent runtime <- the CLI and the
lab. Read from the source (every import statement, at any depth), and checked in a fresh
interpreter for what `pgsidecar run` actually loads."""

from __future__ import annotations

import ast
import functools
import graphlib
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STDLIB = sys.stdlib_module_names


@functools.cache  # the tests below read the same files: each is parsed once
def imports_of(path: Path) -> frozenset[str]:
    """Every module an import statement in ``path`` names (absolute imports only: the project
    uses no relative ones)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            # `from pgsidecar import x` names the module pgsidecar.x
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return frozenset(out)


def modules(package: str) -> dict[str, frozenset[str]]:
    return {
        str(p.relative_to(REPO)): imports_of(p)
        for p in sorted((REPO / package).rglob("*.py"))
        if "__pycache__" not in p.parts
    }


def top(name: str) -> str:
    return name.split(".")[0]


def test_fsm_imports_only_the_standard_library_and_transitions() -> None:
    for path, names in modules("fsm").items():
        bad = {n for n in names if top(n) not in STDLIB and top(n) not in ("fsm", "transitions")}
        assert not bad, f"{path} imports {sorted(bad)}: fsm/ is pure"


def test_events_imports_fsm_and_adapters_never_pgsidecar() -> None:
    """The adapters take their settings from events/settings.py (pgsidecar.config re-exports
    them) and read records with events/sinks.py: no import of pgsidecar at all, lazy ones too."""
    found = modules("events")
    assert "events/settings.py" in found and "events/dcs/etcd.py" in found
    for path, names in found.items():
        upward = sorted(n for n in names if top(n) == "pgsidecar")
        assert not upward, f"{path} imports {upward}: events/ never imports pgsidecar"


def test_nothing_outside_the_lab_and_the_cli_imports_the_lab() -> None:
    for package in ("fsm", "events", "pgsidecar"):
        for path, names in modules(package).items():
            if path.startswith(("pgsidecar/lab/", "pgsidecar/cli/")):
                continue
            lab = sorted(n for n in names if n.startswith("pgsidecar.lab"))
            assert not lab, f"{path} imports {lab}: only the CLI (lazily) may"


def module_name(path: str) -> str:
    """pgsidecar/cli/members.py -> pgsidecar.cli.members; a package's __init__.py -> the package."""
    parts = path.removesuffix(".py").split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` (module -> the modules it imports) as a path, or None."""
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        return list(exc.args[1])
    return None


def test_import_cycle_finds_a_cycle() -> None:
    cycle = import_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})
    assert cycle is not None and cycle[0] == cycle[-1] and set(cycle) == {"a", "b", "c"}
    assert import_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_cli_modules_import_each_other_without_a_cycle() -> None:
    """Every import among pgsidecar/cli/'s modules, lazy ones too, goes one way: the package
    imports its command modules, they import common, nothing imports back."""
    found = {module_name(path): names for path, names in modules("pgsidecar/cli").items()}
    assert {"pgsidecar.cli", "pgsidecar.cli.common", "pgsidecar.cli.run"} <= set(found)
    graph = {mod: {n for n in names if n in found and n != mod} for mod, names in found.items()}
    assert graph["pgsidecar.cli"], "the package imports its command modules"
    cycle = import_cycle(graph)
    assert cycle is None, f"import cycle in the CLI: {' -> '.join(cycle)}"


# What a fresh interpreter has loaded after each step, in one interpreter for both tests below
# (an interpreter that imports the whole agent is most of their time): the commands but the
# lab's own and `run` first, then `run` and the agent's modules, then a lab command. A step that
# loads the lab shows in its own line and in every later one.
FRESH_INTERPRETER = """
import json, sys
from pgsidecar.cli import build_parser
def lab():
    return sorted(m for m in sys.modules if m.startswith('pgsidecar.lab'))
for cmd in ('list', 'switchover', 'history', 'replay', 'local', 'pause', 'config',
            'restart', 'reinit', 'failover'):
    build_parser([cmd])
print(json.dumps(lab()))
build_parser(['run', '--config', 'agent.yaml'])
import pgsidecar.agent, pgsidecar.api, events.kafka, events.k8s
print(json.dumps(lab()))
build_parser(['chaos', '--runs', '1'])
print(json.dumps('pgsidecar.lab.faults' in sys.modules))
"""


@functools.cache
def fresh_interpreter() -> tuple[list[str], list[str], bool]:
    out = subprocess.run(
        [sys.executable, "-c", FRESH_INTERPRETER],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert len(out) == 3, out
    commands, run, chaos = (json.loads(line) for line in out)
    return commands, run, chaos


def test_pgsidecar_run_never_loads_the_lab() -> None:
    """A fresh interpreter that builds the CLI for `pgsidecar run` and imports the agent (what
    a container runs) has no module of pgsidecar.lab loaded; the lab's commands still work."""
    _, run, chaos = fresh_interpreter()
    assert run == [] and chaos is True, (run, chaos)


def test_the_cli_imports_the_lab_only_for_a_command_that_runs_it() -> None:
    """Building the parser for any command but the lab's own (bench, chaos) loads no module of
    pgsidecar.lab: the commands that use lab tooling (local, --dir) import it when they run."""
    commands, _, _ = fresh_interpreter()
    assert commands == [], commands
