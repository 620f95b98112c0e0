"""The package map holds: every import of llmkit (lazy ones too) follows the layer order written in
docs/architecture.md, which this test reads."""

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "llmkit"
MAP = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def documented_order() -> tuple[list[str], set[str], set[tuple[str, str]]]:
    """The units bottom to top, the units of the stages layer, and the arrows allowed between stages."""
    text = MAP.read_text(encoding="utf-8")
    order, stages = [], set()
    for layer, units in re.findall(r"^\| (\w[\w ]*) \| ((?:`[\w_]+`(?: \([^)]*\))?(?:, )?)+) \|", text, re.M):
        names = re.findall(r"`([\w_]+)`", units)
        order += names
        if layer == "stages":
            stages |= set(names)
    allowed = set(re.findall(r"`(\w+) → (\w+)`", text.split("## Files between stages")[0]))
    return order, stages, allowed


def unit_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "llmkit":
        return None
    return "__init__" if len(parts) == 1 else parts[1]


def imports() -> list[tuple[str, str, str]]:
    """(importing file, its unit, imported unit) for every import of an llmkit module."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        source = "__init__" if relative.as_posix() == "__init__.py" else relative.parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            found += [
                (relative.as_posix(), source, unit_of(name)) for name in names if unit_of(name) not in (None, source)
            ]
    return found


def test_the_map_names_every_unit_of_the_package_once():
    order, stages, allowed = documented_order()
    units = {
        path.name.removesuffix(".py")
        for path in PACKAGE.iterdir()
        if path.suffix == ".py" or (path.is_dir() and any(path.glob("*.py")))
    }
    assert len(order) == len(set(order)) and set(order) == units
    assert {"data", "align", "eval", "serve"} <= stages and ("eval", "data") in allowed


def test_every_import_follows_the_layer_order():
    order, stages, allowed = documented_order()
    rank = {unit: position for position, unit in enumerate(order)}
    wrong = [
        f"{path}: {source} -> {target}"
        for path, source, target in imports()
        if rank[target] > rank[source] or (source in stages and target in stages and (source, target) not in allowed)
    ]
    assert wrong == []
