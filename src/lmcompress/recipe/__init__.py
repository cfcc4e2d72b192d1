"""The recipe engine: the schema (`Recipe`, every stage), the typed `Run`, and `run_recipe`.

Stages can be built in Python as well as written in YAML:

    from lmcompress.recipe import DistillStage, EvaluateStage, Recipe, TruncateStage
    recipe = Recipe(teacher="smollm2-135m", corpus={"name": "sotu"},
                    stages=[TruncateStage(keep="every-other"), DistillStage(steps=100, losses=[{"type": "logits"}]),
                            EvaluateStage()])
"""

from lmcompress.recipe.base import STAGES, RecipeSettings, Run, StageConfig, register_stage
from lmcompress.recipe.runner import run_recipe
from lmcompress.recipe.schema import Recipe, load_recipe
from lmcompress.recipe.stages.basic import EvaluateStage, ExportStage, LoadStage, TruncateStage
from lmcompress.recipe.stages.clean import CleanStage
from lmcompress.recipe.stages.factorize import FactorizeStage
from lmcompress.recipe.stages.quantize import QuantizeStage
from lmcompress.recipe.stages.train import DistillStage, FinetuneStage, StudentStage

__all__ = [
    "STAGES", "CleanStage", "DistillStage", "EvaluateStage", "ExportStage", "FactorizeStage", "FinetuneStage",
    "LoadStage", "QuantizeStage", "Recipe", "RecipeSettings", "Run", "StageConfig", "StudentStage",
    "TruncateStage", "load_recipe", "register_stage", "run_recipe",
]
