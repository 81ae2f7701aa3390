"""Recipe files: a JSON object naming a base recipe and typed overrides of any of its fields.

    {"base": "demo", "batch_size": 16, "stages": {"asr": {"max_steps": 300}}, "data": {"dev_split": null}}

Every value is checked against the field's type annotation in training/stages.py; a bad field is
named with its path in the file. Imports nothing of the project but the stage table.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from training.stages import RECIPES, STAGE_NAMES, Recipe, RecipeError


def _check_type(value: Any, annotation: Any, where: str) -> Any:
    """Return value converted to the annotated type, or raise RecipeError naming `where`."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check_type(value, arg, where)
            except RecipeError as err:
                errors.append(str(err))
        raise RecipeError(errors[0] if errors else f"{where}: unexpected value {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_check_type(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise RecipeError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_check_type(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin in (dict, Mapping, typing.Mapping, collections.abc.Mapping) or annotation is Mapping:
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected an object, got {type(value).__name__} {value!r}")
        key_t, val_t = args or (str, Any)
        return {_check_type(k, key_t, f"{where} key"): _check_type(v, val_t, f"{where}.{k}") for k, v in value.items()}
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if annotation in (str, bool):
        if not isinstance(value, annotation):
            raise RecipeError(f"{where}: expected {annotation.__name__}, got {type(value).__name__} {value!r}")
        return value
    raise RecipeError(f"{where}: unsupported field type {annotation}")


def _override(obj: Any, overrides: Mapping[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(type(obj))
    known = {f.name for f in dataclasses.fields(obj)}
    changes = {}
    for key, value in overrides.items():
        if key not in known:
            raise RecipeError(f"{where}: unknown field '{key}' (known: {sorted(known)})")
        changes[key] = _check_type(value, hints[key], f"{where}.{key}")
    return replace(obj, **changes)


def recipe_from_dict(raw: Mapping[str, Any], source: str = "recipe") -> Recipe:
    """Build a recipe from a base recipe plus typed overrides; every bad field is named."""
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: expected a JSON object")
    raw = dict(raw)
    base_name = raw.pop("base", "demo")
    if base_name not in RECIPES:
        raise RecipeError(f"{source}: base '{base_name}' is not a known recipe {sorted(RECIPES)}")
    recipe = RECIPES[base_name]
    stage_overrides = raw.pop("stages", {})
    data_overrides = raw.pop("data", {})
    if not isinstance(stage_overrides, dict):
        raise RecipeError(f"{source}.stages: expected an object mapping stage name to overrides")
    if not isinstance(data_overrides, dict):
        raise RecipeError(f"{source}.data: expected an object")
    stages = list(recipe.stages)
    for name, overrides in stage_overrides.items():
        if name not in STAGE_NAMES:
            raise RecipeError(f"{source}.stages: unknown stage '{name}' (expected one of {STAGE_NAMES})")
        if not isinstance(overrides, dict):
            raise RecipeError(f"{source}.stages.{name}: expected an object")
        i = STAGE_NAMES.index(name)
        stages[i] = _override(stages[i], overrides, f"{source}.stages.{name}")
    recipe = _override(recipe, {"name": raw.pop("name", f"{base_name}+{Path(source).stem}"), **raw}, source)
    recipe = replace(recipe, stages=tuple(stages), data=_override(recipe.data, data_overrides, f"{source}.data"))
    recipe.validate()
    return recipe


def load_recipe(name_or_path: str) -> Recipe:
    """A built-in recipe by name, or a JSON recipe file."""
    if name_or_path in RECIPES:
        return RECIPES[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        raise RecipeError(f"recipe '{name_or_path}': not a built-in recipe {sorted(RECIPES)} and no such file")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise RecipeError(f"{path}: not valid JSON ({err})") from err
    return recipe_from_dict(raw, source=str(path))
