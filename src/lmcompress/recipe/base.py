"""What every recipe has besides its stages, the state a run carries from stage to stage, and the base
of every stage.

A stage is a pydantic model whose `stage: Literal["<name>"]` field is its name (declared once) and which
registers once with `@register_stage`; the recipe's `stages:` list is the discriminated union of every
registered stage. `needs()` says which top-level data sections the stage reads, so a recipe that lacks
one fails before any work.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import datasets
import torch
from pydantic import Field
from torch import nn

from lmcompress.core.config import Strict
from lmcompress.core.errors import LmcompressError, RecipeError
from lmcompress.core.registry import Registry
from lmcompress.data.cache import DataCache
from lmcompress.data.seq2seq import Seq2SeqData
from lmcompress.data.specs import CorpusSpec, Seq2SeqSpec, TaskSpec
from lmcompress.data.tasks import TaskData
from lmcompress.models.adapters import get_adapter
from lmcompress.report.tables import Report

ModelTask = Literal["causal-lm", "seq2seq-lm", "masked-lm", "sequence-classification", "base"]
DataSection = Literal["corpus", "task", "seq2seq"]


class TimeBudget(Strict):
    """A wall-clock limit on the whole run (what `compress --budget 10m` plans to). Before each training stage
    with `max_seconds` the runner rescales that stage's steps and time limit, and so every training stage
    still to come, by one factor: the time the run has left, less `finish_seconds`, over the seconds those
    stages were planned to take. A run ahead of its plan trains longer, one behind it shorter, and the stages
    after training (export, scoring) still fit. A resumed run starts a new clock for what it has left; a
    stage that had begun keeps the settings it began with (`time-budget.json` in the run folder)."""

    seconds: float = Field(gt=0, description="wall time of the run, from its first stage")
    finish_seconds: float = Field(0.0, ge=0, description="what the stages after the last training stage take")


class RecipeSettings(Strict):
    """The recipe's fields other than its stages: the teacher and the data every stage shares."""

    name: str = "run"
    teacher: str | None = Field(
        None, description="built-in name (smollm2-135m, minilm-l6), folder, .gguf file or hub id; "
                          "may be left out when `compress` is given a model object")
    model_task: ModelTask | None = None
    trust_remote_code: bool = False
    corpus: CorpusSpec | None = None
    task: TaskSpec | None = None
    seq2seq: Seq2SeqSpec | None = None
    block_size: int = Field(256, gt=0, description="tokens per training/evaluation block")
    seed: int = 0
    time_budget: TimeBudget | None = None


@dataclass
class Run:
    recipe: RecipeSettings
    out_dir: Path
    teacher: nn.Module | None = None
    student: nn.Module | None = None
    report: Report = field(default_factory=Report)
    resume: bool = False  # training stages continue from their newest checkpoint
    overwrite: bool = False  # earlier outputs of lmcompress (an export at a stage's path) may be replaced
    teacher_bytes: float | None = None  # the teacher's size, for compression ratios
    training_runs: int = 0  # training stages so far; names their checkpoint folders
    # the teacher block each student block started as (a copy of the teacher: all of them; cut by truncate or
    # prune: the kept ones); None for a student not made of the teacher's blocks. `layer_map: kept` reads it.
    student_blocks: list[int] | None = None
    last_export: tuple[Path, str] | None = None  # (path, format) the latest export stage wrote
    data: DataCache = field(init=False)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.data = DataCache(self.recipe.corpus, self.recipe.task, self.recipe.block_size, self.recipe.seq2seq)

    @property
    def tokenizer(self) -> Any:
        return self.data.tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer: Any) -> None:
        self.data.tokenizer = tokenizer

    def require_student(self, stage: str) -> nn.Module:
        if self.student is None:
            raise LmcompressError(f"stage {stage!r} needs a model; put a `load` stage before it")
        return self.student

    def cut_student(self, kept: list[int], stack: str | None = None) -> list[int]:
        """Record that the student kept only blocks `kept` (its own indices); returns and reports them as
        teacher block indices, so a second cut composes with the first. An encoder-decoder's cut of stack
        `stack` is reported per stack, in the stack's own indices."""
        if stack is not None:
            self.report.meta["kept_layers"] = {**(self.report.meta.get("kept_layers") or {}), stack: list(kept)}
            return list(kept)
        if self.student_blocks is None:  # not made of the teacher's blocks: its own indices are all we know
            blocks = list(kept)
        else:
            blocks = self.student_blocks = [self.student_blocks[i] for i in kept]
        self.report.meta["kept_layers"] = blocks
        return blocks

    def require_teacher(self, stage: str) -> nn.Module:
        if self.teacher is None:
            raise LmcompressError(f"stage {stage!r} needs a teacher; put a `load` stage before it")
        return self.teacher

    @property
    def corpus(self) -> datasets.DatasetDict:
        return self.data.corpus

    @property
    def task(self) -> TaskData:
        return self.data.task

    @property
    def seq2seq(self) -> Seq2SeqData:
        return self.data.seq2seq

    def lm_blocks(self, split: str, block_size: int | None = None) -> datasets.Dataset:
        return self.data.lm_blocks(split, block_size)

    def token_stream(self, split: str) -> torch.Tensor:
        return self.data.token_stream(split)

    def save_report(self) -> None:
        self.report.write(self.out_dir, title=self.recipe.name)


@dataclass
class ModelFacts:
    """What stages check before any of them runs (right after the model loads), as earlier stages change
    it: the depth of each block stack of teacher and student (`decoder`, `encoder`, or both for an
    encoder-decoder), and the longest sequence the model takes."""

    teacher_depths: dict[str, int]
    student_depths: dict[str, int]
    max_positions: int | None
    student_blocks_known: bool = True  # whether Run.student_blocks will say where each student block came from

    def stack(self, stack: str | None, field: str) -> str:
        """The block stack `stack` names (None: the model's only one); errors name `field`."""
        names = list(self.student_depths)
        if stack is None:
            if len(names) > 1:
                raise RecipeError(f"{field}: the model is an encoder-decoder with block stacks {' and '.join(names)}; "
                                  "this needs one named (`stack: encoder` or `stack: decoder` where the stage "
                                  "takes it; other stages work on one-stack models only)")
            return names[0]
        if stack not in names:
            raise RecipeError(f"{field}: the model has no {stack} stack (it has: {', '.join(names)})")
        return stack

    def teacher_layers(self, stack: str | None = None, field: str = "stack") -> int:
        return self.teacher_depths[self.stack(stack, field)]

    def student_layers(self, stack: str | None = None, field: str = "stack") -> int:
        return self.student_depths[self.stack(stack, field)]

    def with_student_layers(self, layers: int, stack: str | None = None, field: str = "stack") -> ModelFacts:
        """These facts once the student's stack `stack` has `layers` blocks."""
        return replace(self, student_depths={**self.student_depths, self.stack(stack, field): layers})

    def check_length(self, tokens: int, field: str) -> None:
        if self.max_positions is not None and tokens > self.max_positions:
            raise RecipeError(f"{field}: {tokens} tokens is longer than the model's context "
                              f"({self.max_positions} positions)")

    def check_seq2seq_lengths(self, spec: Seq2SeqSpec) -> None:
        """The seq2seq task's rows fit the model: an encoder-decoder reads source and target separately, a
        decoder-only model the two one after the other."""
        if len(self.student_depths) > 1:
            self.check_length(spec.max_source_length, "seq2seq.max_source_length")
            self.check_length(spec.max_target_length, "seq2seq.max_target_length")
        else:
            self.check_length(spec.max_source_length + spec.max_target_length,
                              "seq2seq.max_source_length + max_target_length")


class StageConfig(Strict):
    """Base of every stage. `stage` names the kind; `name` labels it in reports (defaults to `stage`)."""

    stage: str
    name: str | None = None
    # Whether the stage changes the student (a recipe may not do that after its last export).
    changes_student: ClassVar[bool] = False

    @property
    def label(self) -> str:
        return self.name or self.stage

    def needs(self) -> tuple[DataSection, ...]:
        """Top-level data sections (`corpus`, `task`, `seq2seq`) this stage reads."""
        return ()

    def preflight(self, facts: ModelFacts, recipe: RecipeSettings) -> ModelFacts:
        """Check this stage's settings against the model before any stage runs; return the facts as they
        are after this stage (e.g. fewer layers). Errors name the field."""
        return facts

    def run(self, run: Run) -> None:
        raise NotImplementedError


class CalibrationSettings(Strict):
    """Fields of a stage that measures the model on calibration sequences (PTQ, offline factorization).

    Mixed into the stage; the stage says whether it uses them now (`uses_calibration`)."""

    calibration_samples: int = Field(128, gt=0, description="calibration sequences")
    calibration_data: Literal["auto", "corpus", "task", "seq2seq"] = Field(
        "auto", description="corpus token blocks (LM loss), task examples (task loss) or seq2seq pairs (target "
                            "loss); auto: the task, else the seq2seq pairs, else the corpus, as the recipe has them"
    )
    calibration_batch_size: int = Field(8, gt=0)
    calibration_block_size: int | None = Field(None, gt=0, description="tokens per corpus sequence (default: block_size)")

    def uses_calibration(self) -> bool:
        return True

    def calibration_needs(self) -> tuple[DataSection, ...]:
        """The data section the calibration reads when the recipe names one (`auto` picks at run time)."""
        if not self.uses_calibration() or self.calibration_data == "auto":
            return ()
        return (self.calibration_data,)

    def check_calibration(self, label: str, facts: ModelFacts, recipe: RecipeSettings) -> None:
        """Before any stage runs: the calibration has data, and sequences the model can take."""
        if not self.uses_calibration():
            return
        self._check_data(label, recipe)
        if self._calibration_source(recipe) == "corpus":
            facts.check_length(self.calibration_block_size or recipe.block_size, f"{label}.calibration_block_size")
        elif self._calibration_source(recipe) == "seq2seq":
            facts.check_seq2seq_lengths(recipe.seq2seq)

    def _check_data(self, label: str, recipe: RecipeSettings) -> None:
        if getattr(recipe, self._calibration_source(recipe)) is None:
            raise RecipeError(f"stage {label}: calibration needs data: add a `corpus:`, `task:` or `seq2seq:` "
                              "section")

    def _calibration_source(self, recipe: RecipeSettings) -> DataSection:
        if self.calibration_data != "auto":
            return self.calibration_data
        return "task" if recipe.task is not None else "seq2seq" if recipe.seq2seq is not None else "corpus"

    def calibration_dataset(self, run: Run, label: str) -> datasets.Dataset:
        """Tokenized calibration examples: task examples, seq2seq pairs (for the student's kind of model), or
        corpus blocks of the training split."""
        self._check_data(label, run.recipe)
        if self._calibration_source(run.recipe) == "task":
            return run.task.tokenized(run.tokenizer, "train", run.recipe.task.max_length)
        if self._calibration_source(run.recipe) == "seq2seq":
            model = run.student if run.student is not None else run.require_teacher(label)
            return run.seq2seq.tokenized(run.tokenizer, "train", not get_adapter(model).is_encoder_decoder)
        return run.lm_blocks("train", self.calibration_block_size)


STAGES: Registry[type[StageConfig]] = Registry("stage", "stage")
register_stage = STAGES.register
