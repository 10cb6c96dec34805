"""Recipes: declarative TOML files saying what to quantize and how.

`load_recipe("int8")` loads a built-in recipe (a file in `builtin/`); `load_recipe("my.toml")`
loads a user file. `list_recipes()` lists the built-ins.
"""
from __future__ import annotations

import tomllib
from pathlib import Path

from qcompile.errors import RecipeError
from qcompile.recipes.schema import (
    CalibrationOptions,
    Placement,
    PlacementOptions,
    QuantSpec,
    Recipe,
    Rule,
    ValidationThresholds,
)

BUILTIN_DIR = Path(__file__).parent / "builtin"

__all__ = ["load_recipe", "list_recipes", "Recipe", "Rule", "QuantSpec", "Placement", "PlacementOptions",
           "CalibrationOptions", "ValidationThresholds", "BUILTIN_DIR"]


def list_recipes() -> list[Recipe]:
    """The built-in recipes, sorted by name."""
    return [load_recipe(p) for p in sorted(BUILTIN_DIR.glob("*.toml"))]


def load_recipe(name_or_path: str | Path | Recipe) -> Recipe:
    """Load a built-in recipe by name, or a recipe TOML file by path.

    Raises:
        RecipeError: unknown name, unreadable file, bad TOML, unknown key or bad value.
    """
    if isinstance(name_or_path, Recipe):
        return name_or_path
    text = str(name_or_path)
    path = Path(text)
    if not (text.endswith(".toml") or path.exists()):
        path = BUILTIN_DIR / f"{text}.toml"
        if not path.exists():
            names = ", ".join(p.stem for p in sorted(BUILTIN_DIR.glob("*.toml")))
            raise RecipeError(f"unknown recipe {text!r}; built-in recipes are: {names} (or give a .toml file)")
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise RecipeError(f"recipe file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"cannot read recipe file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"recipe file {path} is not valid TOML: {exc}") from None
    try:
        return Recipe.from_dict(data, source=str(path))
    except RecipeError as exc:
        raise RecipeError(f"{path.name}: {exc}") from None
