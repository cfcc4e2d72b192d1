"""The `verify` stage: targets met or missed are reported (never raised), a target without its measurement
is a clear error, and every evaluated stage is plotted next to the teacher."""

import pytest

from lmcompress.core.errors import LmcompressError
from lmcompress.recipe import Recipe
from lmcompress.recipe.base import Run


def run_with(tmp_path, verify: dict, rows: list[dict], weights_bytes: int | None = 2_000_000) -> Run:
    stages = [{"stage": "evaluate", "name": "teacher", "model": "teacher"}, {"stage": "evaluate", "name": "mid"},
              {"stage": "evaluate", "name": "final", "model": "export"}, {"stage": "verify", **verify}]
    run = Run(recipe=Recipe.parse({"teacher": "tiny", "stages": stages}), out_dir=tmp_path)
    for row in rows:
        run.report.add(**row)
    if weights_bytes is not None:
        (tmp_path / "model").mkdir()
        (tmp_path / "model" / "model.safetensors").write_bytes(b"\0" * weights_bytes)
        (tmp_path / "model" / "tokenizer.json").write_bytes(b"\0" * 500_000)  # not counted: not weights
        run.last_export = (tmp_path / "model", "packed-quant")
    return run


ROWS = [{"stage": "teacher", "model": "teacher", "perplexity": 30.0, "size_mb": 16.0, "decode_tokens_per_s": 10.0},
        {"stage": "mid", "model": "student", "perplexity": 40.0, "size_mb": 2.1},
        {"stage": "final", "model": "export", "perplexity": 33.0, "size_mb": 2.0, "decode_tokens_per_s": 30.0}]


def test_met_and_missed_targets_are_reported_with_their_measurements(tmp_path):
    run = run_with(tmp_path, {"file_mb": 2.0, "max_ppl_ratio": 1.05, "min_decode_speedup": 2.5}, ROWS)
    run.recipe.stages[-1].run(run)
    row = run.report.rows[-1]
    assert (row["file_mb"], row["size_met"]) == (2.0, True)  # the weights file only, not the tokenizer
    assert (row["ppl_ratio"], row["quality_met"]) == (1.1, False)  # 33 / 30 misses 1.05: reported, not raised
    assert (row["decode_speedup"], row["speed_met"]) == (3.0, True)
    assert run.report.figures == {"stages on (file MB, perplexity)": "stages.png"}
    assert (tmp_path / "stages.png").stat().st_size > 0


def test_a_file_over_the_target_is_a_miss(tmp_path):
    run = run_with(tmp_path, {"file_mb": 1.5}, ROWS)
    run.recipe.stages[-1].run(run)
    assert run.report.rows[-1]["size_met"] is False


@pytest.mark.parametrize(("verify", "rows", "weights", "message"), [
    ({"file_mb": 2.0}, ROWS, None, "verify.file_mb: the size target is checked on an export"),
    ({"max_ppl_ratio": 1.2}, ROWS[1:], 1, "verify.max_ppl_ratio: needs the perplexity of the teacher"),
    ({"min_decode_speedup": 2.0}, ROWS[:2], 1, "verify.min_decode_speedup: needs the decode speed"),
])
def test_a_target_without_its_measurement_is_a_clear_error(tmp_path, verify, rows, weights, message):
    run = run_with(tmp_path, verify, rows, weights)
    with pytest.raises(LmcompressError, match=message):
        run.recipe.stages[-1].run(run)


def test_evaluating_the_export_before_any_export_is_refused(tmp_path):
    run = run_with(tmp_path, {}, [], weights_bytes=None)
    with pytest.raises(LmcompressError, match="final.model: export measures what an export stage wrote"):
        run.recipe.stages[2].run(run)
