"""llm-compressor side of `bench/peers.py`: runs inside llm-compressor's own venv (see `peer_tools.py`).

    python bench/peer_llmc.py quantize --model DIR --calib calib.pt --scheme W4A16 --group-size 64 --out OUT
    python bench/peer_llmc.py score --model OUT --ids test_ids.pt --window 512

`quantize`: GPTQ through llm-compressor's `oneshot` on the given calibration blocks (a `[n, length]` tensor of
token ids), saved compressed (compressed-tensors safetensors) with the tokenizer. `score`: a fresh process
loads the saved model back with transformers + compressed-tensors and scores it with lmcompress's own
evaluator (imported from this checkout's `src/`; it needs only torch and tqdm), `rule="llama.cpp"`.
Each prints one last line `RESULT {json}`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

SRC = Path(__file__).resolve().parents[1] / "src"


def quantize(a: argparse.Namespace) -> dict:
    from compressed_tensors.quantization import QuantizationStrategy, preset_name_to_scheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(a.threads)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=getattr(torch, a.dtype))
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    blocks = torch.load(a.calib)
    data = Dataset.from_dict({"input_ids": blocks.tolist(), "attention_mask": torch.ones_like(blocks).tolist()})
    scheme = preset_name_to_scheme(a.scheme, ["Linear"])
    if a.group_size == "row":  # one scale per output row
        scheme.weights.strategy, scheme.weights.group_size = QuantizationStrategy.CHANNEL, None
    elif a.group_size:
        scheme.weights.group_size = int(a.group_size)
    recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])
    started = time.perf_counter()
    oneshot(model=model, dataset=data, recipe=recipe, max_seq_length=blocks.shape[1],
            num_calibration_samples=blocks.shape[0], shuffle_calibration_samples=False)
    seconds = time.perf_counter() - started
    model.save_pretrained(a.out, save_compressed=True)
    tokenizer.save_pretrained(a.out)
    return {"seconds": seconds, "weights": scheme.weights.model_dump(mode="json"),
            "input_activations": scheme.input_activations and scheme.input_activations.model_dump(mode="json")}


def score(a: argparse.Namespace) -> dict:
    sys.path.insert(0, str(SRC))
    from transformers import AutoModelForCausalLM

    from lmcompress.evaluate.perplexity import perplexity

    torch.set_num_threads(a.threads)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    kinds = sorted({type(m).__name__ for m in model.modules() if "Linear" in type(m).__name__})
    ids = torch.load(a.ids)
    out = perplexity(model, ids, window=a.window, rule="llama.cpp", bos_token_id=a.bos,
                     max_tokens=a.chunks * a.window if a.chunks else None, batch_size=a.batch_size)
    out["linear_modules"] = kinds
    out["activation_quantized_modules"] = activation_quantized(model)
    return out


def activation_quantized(model) -> int:
    """How many modules ran with the scheme's activation quantization: compressed-tensors, as transformers
    loads the checkpoint, replaces their forward by its QDQ forward (input quantized dynamically per token;
    the weights, decompressed at the first forward, are left alone). Counted, not assumed."""
    count = 0
    for module in model.modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is not None and scheme.input_activations is not None:
            count += getattr(module.forward, "__func__", None) is not type(module).forward
    return count


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quantize")
    q.add_argument("--model", required=True)
    q.add_argument("--calib", required=True)
    q.add_argument("--scheme", default="W4A16")
    q.add_argument("--group-size", default=None, help="columns per scale, or `row` (per output channel)")
    q.add_argument("--dtype", default="bfloat16")
    q.add_argument("--out", required=True)
    s = sub.add_parser("score")
    s.add_argument("--model", required=True)
    s.add_argument("--ids", required=True)
    s.add_argument("--window", type=int, default=512)
    s.add_argument("--bos", type=int, default=None)
    s.add_argument("--chunks", type=int, default=None)
    s.add_argument("--batch-size", type=int, default=4)
    for x in (q, s):
        x.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    result = quantize(a) if a.cmd == "quantize" else score(a)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
