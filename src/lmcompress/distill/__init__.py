"""Distillation engine: hook-based captures, layer maps, a registry of losses and one accelerate loop.

    from lmcompress.distill import build_objective, parse_loss, train, TrainConfig

    objective = build_objective(teacher, student, [parse_loss({"type": "logits", "temperature": 2.0}),
                                                   parse_loss({"type": "hidden", "layer_map": "uniform+last"})])
    result = train(objective, blocks, TrainConfig(steps=1000, batch_size=8, bf16=True), out_dir)

The recipe stages (`distill`, `finetune`, `student`) live in `lmcompress.recipe.stages.train`.
"""

from lmcompress.distill import contrastive  # noqa: F401, E402  (registers the `contrastive` loss)
from lmcompress.distill.capture import Capture, Needs, capture
from lmcompress.distill.layermaps import layer_map
from lmcompress.distill.losses import (
    LOSSES,
    DistillationObjective,
    DistillLoss,
    LossConfig,
    build_objective,
    parse_loss,
    register_loss,
)
from lmcompress.distill.trainer import TrainConfig, TrainResult, train

__all__ = [
    "Capture", "DistillLoss", "DistillationObjective", "LossConfig", "Needs", "TrainConfig", "TrainResult",
    "build_objective", "capture", "layer_map", "LOSSES", "parse_loss", "register_loss", "train",
]
