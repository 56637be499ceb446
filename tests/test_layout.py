"""The package's layout follows the data flow: no module imports one of a later stage."""
import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "pneumo_tf"
# Stages in the order data flows through them; top-level modules that are not commands are
# shared foundations, usable everywhere.
STAGES = ("records", "data", "models", "evaluation", "training", "inference")
FOUNDATIONS = {"pneumo_tf", "pneumo_tf.cli", "pneumo_tf.errors", "pneumo_tf.fileio"}


def stage(module: str) -> float:
    """-1 for foundations, the stage's index for a stage's modules, infinity for commands."""
    parts = module.split(".")
    if module in FOUNDATIONS:
        return -1
    if len(parts) > 1 and parts[1] in STAGES:
        return STAGES.index(parts[1])
    return float("inf")  # a command (pneumo_tf/train.py, ...)


def imports_of(path: pathlib.Path, module: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.update({node.module, *(f"{node.module}.{alias.name}" for alias in node.names)})
    return {name for name in found if name.startswith("pneumo_tf")}


def test_no_module_imports_one_of_a_later_stage():
    late = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        for imported in imports_of(path, module):
            # `from pneumo_tf.models import exported` names a module; `from x import Name` a name in x.
            if stage(imported) > stage(module) and stage(imported.rsplit(".", 1)[0]) > stage(module):
                late.append(f"{module} imports {imported}")
    assert late == []


def test_every_top_level_module_is_a_command_or_a_foundation():
    top = {path.stem for path in PACKAGE.glob("*.py")} - {"__init__"}
    commands = {"convert", "train", "evaluate", "predict", "serve", "demo", "tune", "data_service"}
    assert top == commands | {name.split(".")[1] for name in FOUNDATIONS if "." in name}


def test_no_two_modules_differ_only_by_a_suffix():
    stems = sorted({path.stem for path in PACKAGE.rglob("*.py")} - {"__init__"})
    pairs = [(a, b) for a in stems for b in stems if a != b and b.startswith(a) and len(b) - len(a) <= 3]
    assert pairs == []
