"""The modules form a tree and their functions fit on a screen.

Method modules on the ground floor (each copyable alone: torch and the standard library only),
`model.py` above them, the pipeline of the step above that, the scripts on top; nothing imports
upward, not even lazily inside a function, and no module imports a script, not even another
script: what two scripts share lives in a module both import. Read from the source with `ast`, so
that imports inside functions count too.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = {path.stem: path for path in sorted(ROOT.glob("*.py"))}
METHOD_MODULES = ("par", "random_walk", "attention_affinity", "cam", "crf_loss")
SCRIPTS = ("train", "evaluate", "bench", "ablation", "prepare_coco")
MAX_FUNCTION_LINES = 80


def imported_modules(path: Path) -> set:
    """The top-level names of every module `path` imports, at any depth of its code."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def project_graph() -> dict:
    """module → the project's modules it imports."""
    return {name: imported_modules(path) & set(MODULES) - {name} for name, path in MODULES.items()}


def find_cycle(graph: dict):
    """One import cycle as a list of modules, or None (depth-first search, three colours)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for child in sorted(graph[node]):
            if state.get(child) == "open":
                return stack[stack.index(child):] + [child]
            if child not in state:
                cycle = visit(child)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_function_level_imports_are_seen(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("import os\n\ndef f():\n    import train\n    from evaluate import run\n")
    assert imported_modules(path) == {"os", "train", "evaluate"}


def test_no_import_cycle():
    graph = project_graph()
    assert {"train", "evaluate", "pipeline", "model"} <= set(graph)
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


@pytest.mark.parametrize("name", [m for m in METHOD_MODULES if m in MODULES])
def test_method_modules_import_no_sibling(name):
    assert project_graph()[name] == set(), f"{name}.py imports {project_graph()[name]}"


def test_no_module_imports_a_script():
    """A script is never imported as a library, not even by another script: evaluate.py and
    bench.py share train.py's configuration and step through config.py and train_step.py."""
    graph = project_graph()
    assert set(SCRIPTS) <= set(graph)
    for name, imports in graph.items():
        assert not imports & set(SCRIPTS), f"{name}.py imports the script(s) {imports & set(SCRIPTS)}"


def test_the_operations_sit_below_the_scripts():
    """The configuration, the step and the run's machinery are modules the scripts import; the
    configuration imports the network's list of backbones alone, the run's machinery no part of
    the method."""
    graph = project_graph()
    assert graph["config"] <= {"model"}  # its list of backbones, no more
    assert graph["train_step"] <= set(METHOD_MODULES) | {"model", "pipeline", "config"}
    assert graph["runner"] <= {"config", "data"}


def test_model_and_pipeline_sit_on_the_method_modules():
    graph = project_graph()
    assert graph["model"] <= set(METHOD_MODULES) | {"vit"}
    assert graph["vit"] == set()
    # the weight files are read above the network: model.py builds, pretrained.py loads
    assert graph["pretrained"] <= {"model", "vit"}
    assert graph["pipeline"] <= set(METHOD_MODULES) | {"model", "fast", "data"}
    # the speed variants sit between the network and the pipeline: the pipeline chooses them,
    # bench.py measures them one by one
    assert graph["fast"] <= set(METHOD_MODULES) | {"model", "vit"}
    assert {name for name, imports in graph.items() if "fast" in imports} == {"pipeline", "bench"}


SPEED_WORDS = ("scaled_dot_product_attention", "forward_fused", "factored", "skip_dropped", "plain_fusion",
               "packed", "partial", "by_grid", "moments", "row_blocks")


@pytest.mark.parametrize("name", ["model", "vit", "cam", "attention_affinity", "par", "pipeline"])
def test_the_method_files_hold_the_plain_forms_only(name):
    """No speed variant, flag or branch on one in the method files and the pipeline (STYLE 18):
    they live in fast.py, chosen once by `pipeline.choose_paths`."""
    text = MODULES[name].read_text()
    assert [word for word in SPEED_WORDS if word in text] == []


def long_functions(path: Path) -> list:
    """(name, lines) of every function or method in `path` longer than MAX_FUNCTION_LINES,
    counted from its `def` (decorators excluded) to its last line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - node.lineno + 1
            if lines > MAX_FUNCTION_LINES:
                found.append((node.name, lines))
    return found


def test_the_length_check_sees_a_long_function(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("def f():\n" + "    x = 1\n" * MAX_FUNCTION_LINES + "\ndef g():\n    pass\n")
    assert long_functions(path) == [("f", MAX_FUNCTION_LINES + 1)]


@pytest.mark.parametrize("name", ["train", "train_step", "runner", "config", "evaluate", "data"])
def test_functions_fit_on_a_screen(name):
    assert long_functions(MODULES[name]) == []


# --- one pseudo-label chain (STYLE 20) ------------------------------------------------------------
LABEL_STAGES = ("cam_to_label", "refine_cams_with_par", "random_walk_cams",
                "refine_propagated_with_par")


def calls_of(path: Path, names) -> list:
    """(function name, line) of every call in `path` of a function named in `names`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Call):
            callee = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            if callee in names:
                found.append((callee, node.lineno))
    return found


def test_the_label_stages_are_called_from_the_pipeline_alone():
    """Training, validation, evaluate.py, the figures and bench.py get their labels from
    pipeline.make_pseudo_labels (or its stage functions): no module outside the pipeline
    chains the stages of cam.py and random walk itself, and the pipeline calls each once."""
    outside = {name: calls_of(path, LABEL_STAGES) for name, path in MODULES.items()
               if name not in ("cam", "pipeline")}
    assert {name: calls for name, calls in outside.items() if calls} == {}
    in_pipeline = [callee for callee, _ in calls_of(MODULES["pipeline"], LABEL_STAGES)]
    assert sorted(set(in_pipeline)) == sorted(LABEL_STAGES)
    assert in_pipeline.count("refine_cams_with_par") == 1
    assert in_pipeline.count("random_walk_cams") == 1
    assert in_pipeline.count("refine_propagated_with_par") == 1
