"""The recipe engine: the schema (`Recipe`, every stage), the typed `Run`, and `run_recipe`."""

from lmcompress.recipe.base import STAGES, RecipeSettings, Run, StageConfig, register_stage
from lmcompress.recipe.runner import run_recipe
from lmcompress.recipe.schema import Recipe, load_recipe

__all__ = ["STAGES", "Recipe", "RecipeSettings", "Run", "StageConfig", "load_recipe", "register_stage", "run_recipe"]
