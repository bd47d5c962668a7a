"""What the recipe-input tests of several tiers share: a recipe in a folder."""

from __future__ import annotations

from conftest import smoke_recipe, write_recipe


def recipe_in(folder, base_model, *data_paths, tmp_path):
    folder.mkdir(parents=True, exist_ok=True)
    recipe = smoke_recipe(base_model, data_paths[0], tmp_path / "out")
    recipe["data"]["train"] = [{"path": str(p)} for p in data_paths]
    return write_recipe(folder / "recipe.yaml", recipe)
