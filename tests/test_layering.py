"""The package's floors (docs/architecture.md): a module imports only from its own floor or below,
and no import climbs back up, at the top of a module or inside a function."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "dreg_jax"
FLOORS = {
    "_checks": 1, "_extras": 1, "_files": 1, "preprocessing": 1,
    "penalties": 2,
    "layers": 3, "models": 3,
    "training": 4, "data": 4,
    "engine": 5,
    "analysis": 6, "tuning": 6, "saved_model": 6,
    "cli": 7, "__init__": 7,
}
# imports a floor may make upward on purpose: the engine's lazy door to its own sweep layer is
# inside the engine; the top-level package re-exports everything (floor 7)
LAYERS_OF = {"tuning": {"tuning", "saved_model"}, "layers": {"layers"}, "models": {"models", "layers"}, "training": {"training"}, "data": {"data", "models"}}


def package_of(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0].removesuffix(".py")


def project_imports(path: pathlib.Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dreg_jax"):
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            yield node.lineno, node.module, names
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("dreg_jax"):
                    yield node.lineno, alias.name, [alias.name]


def target_package(module: str, names) -> str:
    parts = module.split(".")
    if len(parts) == 1:  # "from dreg_jax import x": the submodule x
        sub = names[1].split(".")[1] if len(names) > 1 else "__init__"
        return sub if sub in FLOORS else "__init__"
    return parts[1]


MODULES = sorted(p for p in ROOT.rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(ROOT)) for p in MODULES])
def test_no_import_climbs_a_floor(path):
    own = package_of(path)
    for line, module, names in project_imports(path):
        target = target_package(module, names)
        if target == own:
            continue
        assert FLOORS[target] <= FLOORS[own], (
            f"{path.relative_to(ROOT.parent)}:{line} imports {module} (floor {FLOORS[target]}) from floor {FLOORS[own]}")
        if FLOORS[target] == FLOORS[own]:  # same floor: only the listed direction
            assert target in LAYERS_OF.get(own, set()), f"{path.relative_to(ROOT.parent)}:{line}: {own} -> {target}"


def test_import_and_top_level_help_do_not_start_jax():
    """`import dreg_jax` is light (the flat API imports on first use) and `dreg-jax --help` /
    `--version` never import JAX (their time is measured in benchmarks/cli_help.py); the flat
    names and the subpackages still resolve."""
    import subprocess
    import sys

    code = ("import sys, contextlib, io\n"
            "import dreg_jax, dreg_jax.cli\n"
            "for argv in (['--help'], ['--version']):\n"
            "    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):\n"
            "        dreg_jax.cli.main(argv)\n"
            "    assert 'tune' in out.getvalue() or 'dreg-jax' in out.getvalue()\n"
            "assert 'jax' not in sys.modules, 'JAX was imported'\n"
            "assert callable(dreg_jax.jacobian_terms) and dreg_jax.engine.SweepConfig\n"
            "assert set(dreg_jax.__all__) <= set(dir(dreg_jax))\n"
            "try:\n    dreg_jax.no_such_name\nexcept AttributeError as err:\n    assert 'no_such_name' in str(err)\n"
            "else:\n    raise SystemExit('no AttributeError')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
