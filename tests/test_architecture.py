"""The floors of the package (docs/architecture.md): imports only point down.

    metalearn.core  <  tasks  <  metalearn.evaluation  <  metalearn.training
                    <  metalearn.distributed  <  metalearn.cli

Every import of every module is read from its source (``ast``), including imports
inside functions, so a deferred import cannot hide an upward arrow.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
FLOORS = ["metalearn.core", "tasks", "metalearn.evaluation", "metalearn.training",
          "metalearn.distributed", "metalearn.cli"]
# Function-level imports are allowed only where they must be: Ray actor modules (a
# worker pins its cores before anything loads JAX), the CLI's per-command loading, and
# optional or backend-sensitive libraries.
INNER_IMPORT_MODULES = {"metalearn.distributed.actors", "metalearn.distributed.evaluator",
                        "metalearn.distributed.bench", "metalearn.cli"}
INNER_IMPORT_LIBRARIES = {"tensorboardX", "tensorflow_datasets", "matplotlib.pyplot",
                          # the module that loads Tune's wandb and MLflow callbacks
                          "metalearn.distributed.tune_loggers"}


def modules() -> dict[str, pathlib.Path]:
    found = {}
    for package in ("metalearn", "tasks"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def floor_of(module: str) -> int | None:
    if module == "metalearn.__main__":  # `python -m metalearn`: the command line's floor
        return FLOORS.index("metalearn.cli")
    for index, floor in enumerate(FLOORS):
        if module == floor or module.startswith(floor + "."):
            return index
    return None


def imports_of(path: pathlib.Path, module: str) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every import in ``path``."""
    tree = ast.parse(path.read_text())
    inner = {id(node) for fn in ast.walk(tree)
             if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
             for node in ast.walk(fn)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno, id(node) in inner) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"{path}:{node.lineno}: use an absolute import"
            name = node.module
            out.append((name, node.lineno, id(node) in inner))
            # ``from metalearn import x`` imports the module metalearn.x
            out += [(f"{name}.{alias.name}", node.lineno, id(node) in inner)
                    for alias in node.names if f"{name}.{alias.name}" in modules()]
    return out


ALL = modules()


def test_every_module_is_on_a_floor():
    stray = [m for m in ALL if floor_of(m) is None and m != "metalearn"]
    assert not stray, f"modules outside the floors: {stray}"


@pytest.mark.parametrize("module", sorted(ALL))
def test_imports_point_down(module):
    own = floor_of(module)
    if own is None:
        return
    for name, line, _ in imports_of(ALL[module], module):
        target = floor_of(name)
        if target is None:
            continue
        assert target <= own, (f"{module}:{line} imports {name}, a floor above "
                               f"({FLOORS[target]} > {FLOORS[own]})")
        if module.startswith("tasks"):
            assert name.startswith(("tasks", "metalearn.core")), \
                f"{module}:{line}: tasks may import only metalearn.core, not {name}"


@pytest.mark.parametrize("module", sorted(m for m in ALL if floor_of(m) is not None
                                            and floor_of(m) < FLOORS.index(
                                                "metalearn.distributed")))
def test_floors_below_distributed_never_import_ray(module):
    # The training loop, its single-process runner and everything below run without Ray.
    ray = [(name, line) for name, line, _ in imports_of(ALL[module], module)
           if name == "ray" or name.startswith("ray.")]
    assert not ray, f"{module} imports Ray: {ray}"


@pytest.mark.parametrize("module", sorted(ALL))
def test_imports_at_module_top(module):
    if module in INNER_IMPORT_MODULES:
        return
    inner = [(name, line) for name, line, nested in imports_of(ALL[module], module)
             if nested and name not in INNER_IMPORT_LIBRARIES]
    assert not inner, f"{module}: imports inside functions: {inner}"


def test_the_checker_sees_an_upward_import(tmp_path):
    # The graph test must be able to fail: an upward arrow inside a function is found.
    path = tmp_path / "fake.py"
    path.write_text("def f():\n    from metalearn.training.loop import TrainingLoop\n")
    found = imports_of(path, "metalearn.core.fake")
    assert found == [("metalearn.training.loop", 2, True)]
    assert floor_of(found[0][0]) > floor_of("metalearn.core.fake")
