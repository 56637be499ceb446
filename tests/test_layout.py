"""The package's layout follows the data flow: no module imports one of a later stage, the import
graph has no circle, and no two modules have names a reader could mistake for each other."""
import ast
import itertools
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "pneumo_tf"
# Stages in the order data flows through them; top-level modules that are not commands are
# shared foundations, usable everywhere.
STAGES = ("records", "data", "models", "evaluation", "training", "inference")
FOUNDATIONS = {"pneumo_tf", "pneumo_tf.cli", "pneumo_tf.errors", "pneumo_tf.fileio"}
COMMANDS = {"convert", "train", "evaluate", "predict", "serve", "demo", "tune", "data_service", "synthesise",
            "dicom_node", "describe"}


def stage(module: str) -> float:
    """-1 for foundations, the stage's index for a stage's modules, infinity for commands."""
    parts = module.split(".")
    if module in FOUNDATIONS:
        return -1
    if len(parts) > 1 and parts[1] in STAGES:
        return STAGES.index(parts[1])
    return float("inf")  # a command (pneumo_tf/train.py, ...)


def module_name(path: pathlib.Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: pathlib.Path) -> set[str]:
    """Every pneumo_tf name the file imports, at the top or inside a function: modules, and for
    `from x import y` both x and x.y (y may be a module or a name in x)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.update({node.module, *(f"{node.module}.{alias.name}" for alias in node.names)})
    return {name for name in found if name.startswith("pneumo_tf")}


def imported_modules(path: pathlib.Path) -> set[str]:
    """The package's modules the file imports (`from pneumo_tf.models import exported` names the
    module pneumo_tf.models.exported; `from pneumo_tf.cli import option` the module pneumo_tf.cli)."""
    return {name if name in MODULES else name.rsplit(".", 1)[0] for name in imports_of(path)} & set(MODULES)


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module, or of one that imports itself (Tarjan)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for neighbour in sorted(graph.get(node, ())):
            if neighbour not in index:
                visit(neighbour)
                low[node] = min(low[node], low[neighbour])
            elif neighbour in on_stack:
                low[node] = min(low[node], index[neighbour])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_one_of_a_later_stage():
    late = []
    for module, path in MODULES.items():
        for imported in imports_of(path):
            # `from pneumo_tf.models import exported` names a module; `from x import Name` a name in x.
            if stage(imported) > stage(module) and stage(imported.rsplit(".", 1)[0]) > stage(module):
                late.append(f"{module} imports {imported}")
    assert late == []


def test_the_import_graph_has_no_circle():
    graph = {module: imported_modules(path) - {module} for module, path in MODULES.items()}
    assert circles(graph) == []


def test_the_circle_finder_finds_circles():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"a"}, "b": set()}) == [["a"]]
    assert circles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_every_top_level_module_is_a_command_or_a_foundation():
    top = {path.stem for path in PACKAGE.glob("*.py")} - {"__init__"}
    assert top == COMMANDS | {name.split(".")[1] for name in FOUNDATIONS if "." in name}


def names_of(module: str) -> set[str]:
    """What a reader may call a module: its file's stem (`tune`) and its path in the package joined
    with underscores (`training_tune`, `data_service` for data/service.py)."""
    parts = module.split(".")[1:]
    return {parts[-1], "_".join(parts)}


def confusable(a: str, b: str) -> bool:
    """Equal, or one is the other plus a short suffix (`mask`, `masks`; `tune`, `tuner`)."""
    shorter, longer = sorted((a, b), key=len)
    return longer.startswith(shorter) and len(longer) - len(shorter) <= 3


def test_no_two_modules_have_confusable_names():
    modules = sorted(module for module, path in MODULES.items() if path.name != "__init__.py")
    pairs = [(a, b) for a, b in itertools.combinations(modules, 2)
             if any(confusable(x, y) for x in names_of(a) for y in names_of(b))]
    assert pairs == []


def test_confusable_names_are_found_across_folders():
    assert confusable("tune", "tune") and confusable("mask", "masks") and not confusable("metric", "masks")
    assert names_of("pneumo_tf.data.service") & names_of("pneumo_tf.data_service")
    assert names_of("pneumo_tf.training.tune") & names_of("pneumo_tf.tune")
