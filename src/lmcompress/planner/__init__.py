"""The planner behind `lmcompress compress MODEL --to TARGET`: from a size target and a compute budget to a
recipe, with every decision and the measurement behind it.

    from lmcompress.planner import parse_target, parse_budget, plan_compression
    plan = plan_compression(model, parse_target("8x"), parse_budget("10m"), teacher="smollm2-135m",
                            corpus={"name": "sotu"})
    print(plan.yaml())
"""

from lmcompress.planner.plan import Decision, Plan, plan_compression
from lmcompress.planner.targets import Budget, Target, parse_budget, parse_target
from lmcompress.planner.task import plan_task_compression

__all__ = ["Budget", "Decision", "Plan", "Target", "parse_budget", "parse_target", "plan_compression",
           "plan_task_compression"]
