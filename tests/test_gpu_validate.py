"""The GPU validation script's dry run: the same code path on the CPU at a tiny budget, every row trained
and measured, its results written as JSON (what the GPU run hands back under $OUT)."""

import json
import os
import subprocess
import sys

import pytest
from helpers import ROOT, integration

sys.path.insert(0, str(ROOT / "bench" / "gpu"))
import assets  # noqa: E402  (bench/gpu/assets.py)


@integration
@pytest.mark.integration
@pytest.mark.slow
def test_validate_dry_run_trains_and_measures_every_row(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    proc = subprocess.run(["bash", str(ROOT / "bench/gpu/validate.sh"), "--dry-run"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "validate.json").read_text())
    assert result["dry_run"] and result["teacher_ppl"] > 1
    rows = {r["row"]: r for r in result["rows"]}
    assert list(rows) == ["quantgpt W2-E2-A8", "ternary T-T-8", "half-depth od", "half-depth hs", "half-depth mha"]
    for row in rows.values():
        assert row["train_tokens"] == 256 and row["test_ppl"] > 1 and row["train_tokens_per_s"] > 0
        assert [point["tokens"] for point in row["curve"]] == [128, 256]
        assert row["peak_memory_mb"] > 0
    assert "| quantgpt W2-E2-A8 |" in proc.stdout  # the printed table


def test_carried_parts_are_joined_and_checked(tmp_path):
    received, downloads = tmp_path / "received", tmp_path / "downloads"
    for part in ("part1", "part2"):
        (received / part).mkdir(parents=True)
    data = bytes(range(256)) * 40
    (received / "part1" / "gguf.0").write_bytes(data[:5000])
    (received / "part2" / "gguf.1").write_bytes(data[5000:])
    (received / "part2" / assets.SOTU).write_bytes(b"sotu archive")
    manifest = {"gguf": {"name": assets.GGUF, "sha256": __import__("hashlib").sha256(data).hexdigest(),
                         "parts": ["part1/gguf.0", "part2/gguf.1"]},
                "files": {f"part2/{assets.SOTU}": assets.sha256(received / "part2" / assets.SOTU)}, "wheels": []}
    (received / "part2" / "manifest.json").write_text(json.dumps(manifest))
    assets.unpack(received, downloads)
    assert (downloads / assets.GGUF).read_bytes() == data and (downloads / assets.SOTU).read_bytes() == b"sotu archive"
    (received / "part1" / "gguf.0").write_bytes(b"x" + data[1:5000])  # damaged in transit
    with pytest.raises(SystemExit, match="sha256 mismatch"):
        assets.unpack(received, downloads)
    (received / "part1" / "gguf.0").unlink()  # call 1 never ran
    with pytest.raises(SystemExit, match="part1/gguf.0 not received"):
        assets.unpack(received, downloads)
