"""The house rule: every module imports only modules below it. No import cycle, counting the imports
inside functions (which Python would happily run, hiding the cycle)."""
import ast
import graphlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def project_modules() -> dict:
    """{module name: file} for tunebench's modules and the two scripts."""
    modules = {f"tunebench.{path.stem}": path for path in sorted((ROOT / "tunebench").glob("*.py"))}
    modules.update({script: ROOT / f"{script}.py" for script in ("train", "evaluate")})
    return modules


def imports_of(path: Path, modules: dict) -> set:
    """The project modules a file imports, wherever in the file the import stands."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # from tunebench import data
    return found & set(modules)


def import_graph() -> dict:
    modules = project_modules()
    return {name: imports_of(path, modules) - {name, "tunebench.__init__"} for name, path in modules.items()}


def test_no_module_imports_one_that_imports_it_back():
    graph = import_graph()
    try:
        order = list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as e:
        raise AssertionError(f"import cycle: {' -> '.join(e.args[1])}") from None
    assert set(order) == set(graph)


def test_the_check_finds_a_cycle_hidden_in_a_function(tmp_path):
    (tmp_path / "a.py").write_text("from tunebench import b\n")
    (tmp_path / "b.py").write_text("def late():\n    from tunebench import a\n")
    modules = {"tunebench.a": tmp_path / "a.py", "tunebench.b": tmp_path / "b.py"}
    graph = {name: imports_of(path, modules) for name, path in modules.items()}
    assert graph == {"tunebench.a": {"tunebench.b"}, "tunebench.b": {"tunebench.a"}}
    try:
        list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError:
        return
    raise AssertionError("the cycle through a function-level import was not found")
