"""The foundation stages: load, truncate, evaluate, export."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, ClassVar, Literal

from accelerate import PartialState
from pydantic import Field, model_validator
from torch import nn

from lmcompress.core.errors import LmcompressError
from lmcompress.core.files import folder_bytes
from lmcompress.evaluate import (
    decode_speed,
    evaluate_classifier,
    evaluate_generation,
    perplexity,
    prefill_speed,
)
from lmcompress.evaluate.llamacpp import HOW as LLAMA_CPP_HOW
from lmcompress.evaluate.llamacpp import find_llama_bench, llama_bench
from lmcompress.formats import export_model, load_inference, load_model, size_report
from lmcompress.formats.card import CardFacts, teacher_card_facts
from lmcompress.infer import attach, resident_bytes, to_inference
from lmcompress.infer.convert import has_quantized
from lmcompress.infer.lean import LeanGenerate
from lmcompress.models.adapters import get_adapter
from lmcompress.models.builtin import BUILTIN_ORIGINS
from lmcompress.models.loading import quantized_source
from lmcompress.recipe.base import DataSection, ModelFacts, RecipeSettings, Run, StageConfig, register_stage
from lmcompress.surgery.truncate import resolve_layers, truncate_layers

log = logging.getLogger(__name__)


@register_stage
class LoadStage(StageConfig):
    """Load the teacher (the recipe's `teacher`, or `model` here; or take the model `compress` was given)
    and make the student a copy of it."""

    changes_student: ClassVar[bool] = True

    stage: Literal["load"] = "load"
    model: str | None = Field(None, description="load this instead of the recipe's teacher")
    dtype: Literal["fp32", "bf16"] = "fp32"
    copy_student: bool = Field(True, description="make the student a copy of the teacher (off for eval only)")

    def run(self, run: Run) -> None:
        recipe = run.recipe
        source = self.model or recipe.teacher
        if source is not None:
            num_labels = run.task.num_labels if recipe.model_task == "sequence-classification" else None
            run.teacher, run.tokenizer = load_model(
                source, task=recipe.model_task, dtype=self.dtype,
                num_labels=num_labels, trust_remote_code=recipe.trust_remote_code,
            )
        elif run.teacher is None:
            raise LmcompressError(f"{self.label}: the recipe names no `teacher:` and no model was given")
        # Every stage runs where the model is: on the device accelerate gives this process (a GPU when there
        # is one; the CPU otherwise), so measurement, pruning and PTQ use it as training does.
        run.teacher.to(PartialState().device)
        quantized = quantized_source(run.teacher)
        if quantized:  # dequantized on load: its quality, and so the student's ceiling, is the file's
            note = f"{quantized} (the teacher is itself quantized; dequantized to float on load)"
            run.report.meta["teacher_quantized"] = note
            log.warning("teacher %s: %s", source, note)
        for p in run.teacher.parameters():
            p.requires_grad_(False)
        if self.copy_student:
            run.student = copy.deepcopy(run.teacher)
            adapter = get_adapter(run.teacher)  # an encoder-decoder's two stacks are not tracked
            run.student_blocks = None if adapter.is_encoder_decoder else list(range(adapter.num_layers))
            for p in run.student.parameters():
                p.requires_grad_(True)
        size = size_report(run.teacher)
        run.teacher_bytes = size["bytes"]
        run.report.meta["teacher_params"] = size["params"]  # from the export plan: packed codes count too


@register_stage
class TruncateStage(StageConfig):
    """Layer reduction: keep an explicit layer list, every other layer, or the first/last k layers."""

    changes_student: ClassVar[bool] = True

    stage: Literal["truncate"] = "truncate"
    keep: list[int] | Literal["every-other", "first-k", "last-k"]
    k: int | None = Field(None, gt=0, description="number of layers for first-k / last-k")
    stack: Literal["encoder", "decoder"] | None = Field(
        None, description="the block stack to cut (encoder-decoder models; others have one)")

    def preflight(self, facts: ModelFacts, recipe: RecipeSettings) -> ModelFacts:
        field = f"{self.label}.stack"
        kept = resolve_layers(self.keep, facts.student_layers(self.stack, field), self.k, field=f"{self.label}.keep")
        return facts.with_student_layers(len(kept), self.stack, field)

    def run(self, run: Run) -> None:
        student = run.require_student(self.stage)
        adapter = get_adapter(student, self.stack)
        layers = resolve_layers(self.keep, adapter.num_layers, self.k, field=f"{self.label}.keep")
        truncate_layers(student, layers, stack=self.stack)
        run.cut_student(layers, adapter.stack if adapter.is_encoder_decoder else None)


def _deployed(model: nn.Module) -> nn.Module:
    """The model as it runs once deployed, for timing: quantized modules (fake-quant or packed) through the
    integer kernels, with lean decoding where it applies; an inference-form or float model as it is."""
    if isinstance(model.__dict__.get("generate"), LeanGenerate) or not has_quantized(model):
        return model
    fast = to_inference(copy.deepcopy(model))
    attach(fast)
    return fast


@register_stage
class EvaluateStage(StageConfig):
    """Measure quality (perplexity, task metrics, or ROUGE of generated targets), size and speed of the
    student, the teacher, or the latest export as a user loads it (`model: export`: a packed-quant folder
    through the integer kernels, any other through `load`; its size is the files on disk, `memory_mb` the
    tensors it holds in memory)."""

    stage: Literal["evaluate"] = "evaluate"
    model: Literal["student", "teacher", "export"] = "student"
    metrics: list[Literal["perplexity", "accuracy", "rouge", "size", "speed"]] | None = None
    split: Literal["train", "validation", "test"] = "test"
    max_tokens: int | None = Field(None, gt=1, description="score at most this many tokens (perplexity)")
    window: int | None = Field(None, gt=1, description="perplexity window (default: the recipe's block_size)")
    stride: int | None = Field(None, gt=0, description="sliding-window stride (default: window, i.e. disjoint)")
    batch_size: int = Field(4, gt=0)
    bos: Literal["auto", "always", "never"] = Field(
        "auto", description="start each perplexity window with BOS: auto follows the tokenizer (does it add one?)")
    num_beams: int = Field(1, gt=0, description="rouge: beam search width (1: greedy)")
    max_new_tokens: int | None = Field(None, gt=0, description="rouge: tokens generated per example (default: "
                                                               "the seq2seq task's max_target_length)")
    examples: int | None = Field(None, gt=0, description="rouge: score the first N test examples (default: all)")

    @model_validator(mode="after")
    def _stride_fits(self) -> EvaluateStage:
        if self.stride and self.window and self.stride > self.window:
            raise ValueError(f"stride ({self.stride}) must not exceed window ({self.window})")
        return self

    def needs(self) -> tuple[DataSection, ...]:
        metrics = self.metrics or []
        return (("corpus",) if {"perplexity", "speed"} & set(metrics) else ()) + (
            ("task",) if "accuracy" in metrics else ()) + (("seq2seq",) if "rouge" in metrics else ())

    def preflight(self, facts: ModelFacts, recipe: RecipeSettings) -> ModelFacts:
        if self.window is not None or recipe.corpus is not None:
            facts.check_length(self.window or recipe.block_size, f"{self.label}.window")
        if "rouge" in (self.metrics or []):
            facts.check_seq2seq_lengths(recipe.seq2seq)
        return facts

    def _bos(self, tokenizer: Any) -> int | None:
        """The BOS id to start each window with: the tokenizer's convention unless `bos` says otherwise."""
        bos = getattr(tokenizer, "bos_token_id", None)
        if self.bos == "never" or bos is None:
            if self.bos == "always":
                raise LmcompressError(f"{self.label}.bos: always, but the tokenizer has no BOS token")
            return None
        if self.bos == "always":
            return bos
        return bos if tokenizer("a")["input_ids"][:1] == [bos] else None  # does it add BOS itself?

    def _metrics(self, run: Run) -> list[str]:
        if self.metrics:
            return self.metrics
        recipe = run.recipe
        quality = (["perplexity"] if recipe.corpus else ["accuracy"] if recipe.task else
                   ["rouge"] if recipe.seq2seq else [])
        return [*quality, "size"]

    def _rouge(self, run: Run, model: nn.Module) -> dict[str, Any]:
        data = run.seq2seq
        rows = data.test.select(range(min(self.examples or len(data.test), len(data.test))))
        decoder_only = not get_adapter(model).is_encoder_decoder
        scores = evaluate_generation(
            model, run.tokenizer, [data.prompt(s, decoder_only) for s in rows["source"]], rows["target"],
            max_source_length=data.spec.max_source_length, num_beams=self.num_beams,
            max_new_tokens=self.max_new_tokens or data.spec.max_target_length, batch_size=self.batch_size)
        return {"rouge1": round(scores["rouge1"], 2), "rouge2": round(scores["rouge2"], 2),
                "rougeL": round(scores["rougeL"], 2), "exact_match": round(scores["exact_match"], 2),
                "rouge_examples": scores["examples"],
                "num_beams": self.num_beams, "generated_tokens_per_s": round(scores["tokens_per_s"] or 0.0, 1)}

    def _exported(self, run: Run) -> nn.Module:
        if run.last_export is None:
            raise LmcompressError(f"{self.label}.model: export measures what an export stage wrote; put one before "
                                  "this stage")
        path, fmt = run.last_export
        model, _ = load_inference(path) if fmt == "packed-quant" else load_model(path)
        return model.eval()

    def run(self, run: Run) -> None:
        if self.model == "export":
            model = self._exported(run)
        else:
            model = run.teacher if self.model == "teacher" else run.require_student(self.stage)
        if model is None:
            raise LmcompressError(f"{self.label}: no teacher loaded")
        adapter = get_adapter(model)
        row = {"stage": self.label, "model": self.model,
               **{(f"{st}_layers" if adapter.is_encoder_decoder else "layers"): adapter.on(st).num_layers
                  for st in adapter.stacks}}
        metrics = self._metrics(run)
        window = self.window or run.recipe.block_size
        if "perplexity" in metrics:
            ppl = perplexity(model, run.token_stream(self.split), window=window, stride=self.stride,
                             max_tokens=self.max_tokens, batch_size=self.batch_size,
                             bos_token_id=self._bos(run.tokenizer))
            row.update(perplexity=round(ppl["perplexity"], 3), eval_tokens=ppl["tokens"],
                       eval_documents=run.data.documents_within(self.split, ppl["last_token"]),
                       eval_tokens_per_s=round(ppl["eval_tokens_per_s"], 1))
            if run.data.corpus_counts is not None:
                run.report.meta["corpus"] = run.data.corpus_counts.summary()
        if "accuracy" in metrics:
            split = "test" if self.split != "train" else "train"
            scores = evaluate_classifier(model, run.tokenizer, run.task, split, batch_size=max(self.batch_size, 16))
            row.update({k: round(v, 4) if isinstance(v, float) else v for k, v in scores.items()})
        if "rouge" in metrics:
            row.update(self._rouge(run, model))
        if "size" in metrics and self.model == "export":
            disk = weight_file_bytes(run.last_export[0])
            row["size_mb"] = round(disk / 1e6, 3)
            if run.last_export[1] != "gguf":  # a GGUF runs in llama.cpp, not as the float copy read back here
                row["memory_mb"] = round(resident_bytes(model) / 1e6, 2)
            if run.teacher_bytes:
                row["compression_ratio"] = round(run.teacher_bytes / disk, 3)
        elif "size" in metrics:
            size = size_report(model, teacher_bytes=run.teacher_bytes)
            row.update(params=size["params"], size_mb=round(size["mb"], 2),
                       bits_per_param=round(size["bits_per_param"], 3),
                       compression_ratio=round(size.get("compression_ratio", 1.0), 3))
        if "speed" in metrics:
            row.update(self._speed(run, model, window))
        run.report.add(**row)

    def _speed(self, run: Run, model: nn.Module, window: int) -> dict[str, Any]:
        """Prefill and decode tokens/s through the model's best runtime here: llama.cpp for a GGUF export
        (llama-bench, where it is found), else our inference form (lean decoding where it runs)."""
        gguf = self.model == "export" and run.last_export[1] == "gguf"
        tool = find_llama_bench() if gguf else None
        if tool is not None:
            return {**llama_bench(run.last_export[0], tool, prompt=window), "speed_path": "llama.cpp"}
        ids = run.token_stream(self.split)[: 2 * window].view(2, window)
        deployed = _deployed(model)
        path = "lean" if isinstance(deployed.__dict__.get("generate"), LeanGenerate) else "transformers"
        return {"prefill_tokens_per_s": round(prefill_speed(deployed, ids), 1),
                "decode_tokens_per_s": round(decode_speed(deployed, ids[:1, :32]), 1),
                "speed_path": f"{path} (the GGUF dequantized: llama-bench not found; {LLAMA_CPP_HOW})" if gguf else path}


@register_stage
class ExportStage(StageConfig):
    """Save the student: plain safetensors (fp32/bf16), or the compressed form its modules need."""

    stage: Literal["export"] = "export"
    path: str | None = Field(None, description="output folder (default: <out>/model)")
    dtype: Literal["fp32", "bf16"] = "fp32"
    format: Literal["auto", "hf", "gguf", "compressed-tensors"] = Field(
        "auto", description="auto: packed/factorized when the student has such modules, else hf; "
                            "compressed-tensors: what vLLM serves (int weights per row or group, A8)")

    def target(self, out_dir: Path) -> Path:
        """Where this export writes: `path`, or `<out>/model` (`<out>/model.gguf` for GGUF)."""
        return Path(self.path) if self.path else Path(out_dir) / ("model.gguf" if self.format == "gguf" else "model")

    def run(self, run: Run) -> None:
        student = run.require_student(self.stage)
        # A resumed run re-runs its export: replacing the one it wrote before is what was asked.
        written, fmt = export_model(student, run.tokenizer, self.target(run.out_dir), dtype=self.dtype,
                                    format=self.format, overwrite=run.resume or run.overwrite,
                                    card=card_facts(run))
        disk = folder_bytes(written) if Path(written).is_dir() else Path(written).stat().st_size
        run.last_export = (Path(written), fmt)
        row = {"stage": self.label, "model": "student", "format": fmt, "path": str(written),
               "disk_mb": round(disk / 1e6, 2)}
        if run.teacher_bytes:
            row["disk_compression_ratio"] = round(run.teacher_bytes / disk, 3)
        run.report.add(**row)


def weight_file_bytes(path: Path) -> int:
    """Bytes of an export's weight files (.safetensors, .gguf): what a size target counts, without the
    tokenizer, config and card next to them."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".safetensors", ".gguf"))


def card_facts(run: Run) -> CardFacts:
    """What the export's model card says: the teacher's origin and license, the recipe, the measurements."""
    teacher, origin = run.recipe.teacher, {}
    if teacher in BUILTIN_ORIGINS:
        origin = dict(zip(("base_model", "license"), BUILTIN_ORIGINS[teacher], strict=True))
    elif teacher and Path(teacher).expanduser().is_dir():
        origin = teacher_card_facts(Path(teacher).expanduser())
    elif teacher and not Path(teacher).suffix and teacher.count("/") == 1:
        origin = {"base_model": teacher}  # a hub id
    measured = [row for row in run.report.rows if "perplexity" in row or "accuracy" in row]
    return CardFacts(**origin, recipe=run.recipe.name, stages=[st.label for st in run.recipe.stages],
                     metrics=measured)
