"""The project's standing rules on its own shape (docs/ARCHITECTURE.md, "Layout"): files stay small
enough to read (a stage module at most 300 lines, any other module at most 400: split one by idea
when it outgrows that), and imports only point down the five layers."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CODE_DIRS = ["scope_cli", "stages", "bench"]

# layer of a module, by its dotted name's prefix (longest first); ground = everything else in scope_cli
LAYERS = [("scope_cli.cli", 5), ("bench", 5), ("stages", 4), ("scope_cli.models", 4), ("scope_cli.core", 3),
          ("scope_cli.backends", 2)]


def modules() -> list[tuple[str, Path]]:
    out = []
    for folder in CODE_DIRS:
        for path in sorted((REPO / folder).rglob("*.py")):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            out.append((name.removesuffix(".__init__"), path))
    return out


def layer(name: str) -> int:
    return next((n for prefix, n in LAYERS if name == prefix or name.startswith(prefix + ".")), 1)


def project_imports(path: Path) -> set[str]:
    """Every project module `path` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            if node.module in ("scope_cli", "stages"):  # `from stages import eval`: the module eval
                found.update(f"{node.module}.{a.name}" for a in node.names)
    return {n for n in found if n.split(".")[0] in ("scope_cli", "stages")}


@pytest.mark.parametrize("name, path", modules(), ids=lambda v: v if isinstance(v, str) else "")
def test_a_module_stays_small(name, path):
    limit = 300 if name.startswith("stages.") else 400
    lines = len(path.read_text().splitlines())
    assert lines <= limit, f"{path.relative_to(REPO)}: {lines} lines (at most {limit}); split it by idea"


def test_imports_only_point_down_the_layers():
    up = []
    for name, path in modules():
        for target in project_imports(path):
            if target in ("scope_cli", "stages"):
                continue  # a package's face (e.g. scope_cli.__version__)
            same_stage = name.startswith("stages.") and target.startswith("stages.")
            if layer(target) > layer(name) or (same_stage and target != name):
                up.append(f"{name} -> {target}")
    assert up == [], "imports that point up a layer or from one stage to another: " + ", ".join(up)


def test_the_rules_can_fail():
    """The layer table names real folders, so the import check above is not vacuous."""
    names = [n for n, _ in modules()]
    for prefix, _ in LAYERS:
        assert any(n.startswith(prefix) for n in names), prefix
    assert layer("scope_cli.backends.vllm") == 2 and layer("scope_cli.errors") == 1
