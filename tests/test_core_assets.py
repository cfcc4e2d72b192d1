from pathlib import Path

import pytest

from lmcompress.core import assets
from lmcompress.core.errors import AssetError


def test_a_failing_asset_is_named_and_the_others_still_arrive(tmp_path, monkeypatch):
    monkeypatch.setenv("LMCOMPRESS_HOME", str(tmp_path))

    def good(downloads: Path, target: Path) -> None:
        (target / "data.txt").write_text("ok")

    def bad(downloads: Path, target: Path) -> None:
        assets.run_command(["sh", "-c", "echo registry said no >&2; exit 3"], downloads, "downloading broken")

    fake = {
        "broken": assets.Asset("broken", "corpus", "always fails", bad),
        "fine": assets.Asset("fine", "corpus", "always works", good),
    }
    monkeypatch.setattr(assets, "ASSETS", fake)
    results = assets.fetch_all()
    assert results["fine"] == "fetched" and (tmp_path / "corpus" / "fine" / "data.txt").read_text() == "ok"
    assert results["broken"].startswith("FAILED: downloading broken: command `sh -c")
    assert "registry said no" in results["broken"]
    assert not (tmp_path / "corpus" / "broken").exists()  # nothing half-written is left behind
    assert assets.fetch_all()["fine"] == "cached"
    with pytest.raises(AssetError, match="unknown built-in asset 'nope'"):
        assets.ensure("nope")
