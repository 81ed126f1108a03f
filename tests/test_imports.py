"""The recipes' structure: a recipe imports `recipes.common`, never another recipe, and
`recipes.common` imports no recipe (so that each recipe reads, and changes, on its own)."""

import ast
import pathlib

import pytest
from recipe_testing import ROOT

RECIPES = sorted(p.parent.name for p in (ROOT / "recipes").glob("*/__init__.py")
                 if p.parent.name != "common")


def imported_packages(package: pathlib.Path) -> dict[str, set[str]]:
    """`{file: the recipes.* packages it imports}` for every module of `package` (imports
    inside functions included)."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module)
                if node.module == "recipes":  # `from recipes import sentiment`
                    names.update(f"recipes.{alias.name}" for alias in node.names)
        found[str(path.relative_to(ROOT))] = {
            n.split(".")[1] for n in names if n.startswith("recipes.")}
    return found


def test_there_are_recipes():
    assert {"sentiment", "language_model", "copy_task"} <= set(RECIPES)


@pytest.mark.parametrize("recipe", RECIPES)
def test_a_recipe_imports_no_other_recipe(recipe):
    imports = imported_packages(ROOT / "recipes" / recipe)
    assert imports
    others = {f: sorted(p - {recipe, "common"}) for f, p in imports.items()}
    assert not {f: p for f, p in others.items() if p}


def test_common_imports_no_recipe():
    imports = imported_packages(ROOT / "recipes" / "common")
    assert not {f: sorted(p - {"common"}) for f, p in imports.items() if p - {"common"}}
