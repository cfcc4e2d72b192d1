"""Helpers shared by the tests: tiny random-init models of each family, the real-asset marker, tiny recipes."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
sys.path.insert(0, str(ROOT / "bench"))  # bench/pollute.py: the synthetic polluter tests share with the bench
VOCAB = 128


def tiny_config(family: str, layers: int = 4, hidden: int = 32, heads: int = 4, kv_heads: int = 2, **extra):
    common = {"vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    if family == "llama":
        cfg = transformers.LlamaConfig(
            hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
            tie_word_embeddings=True, **common,
        )
    elif family == "gpt2":
        cfg = transformers.GPT2Config(
            n_embd=hidden, n_layer=layers, n_head=heads, n_positions=256, **common,
        )
    elif family == "bert":
        cfg = transformers.BertConfig(
            hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
            num_attention_heads=heads, max_position_embeddings=256, **common,
        )
    elif family == "bart":  # scaled embeddings: the stacks' lookups multiply the shared table's rows
        cfg = transformers.BartConfig(
            d_model=hidden, encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=heads,
            decoder_attention_heads=heads, encoder_ffn_dim=hidden * 2, decoder_ffn_dim=hidden * 2,
            max_position_embeddings=256, scale_embedding=True, decoder_start_token_id=2, forced_eos_token_id=None,
            **common,
        )
    elif family == "t5":
        cfg = transformers.T5Config(
            d_model=hidden, d_kv=hidden // heads, d_ff=hidden * 2, num_layers=layers, num_decoder_layers=layers,
            num_heads=heads, decoder_start_token_id=0, **common,
        )
    else:
        raise ValueError(family)
    for k, v in extra.items():
        setattr(cfg, k, v)
    cfg._attn_implementation = "eager"
    return cfg


def tiny_model(family: str, task: str | None = None, seed: int = 0, **kw):
    """A tiny random-init model: causal LM for llama/gpt2, masked LM or classifier for bert, conditional
    generation for bart/t5."""
    torch.manual_seed(seed)
    cfg = tiny_config(family, **kw)
    if family in ("bart", "t5"):
        return transformers.AutoModelForSeq2SeqLM.from_config(cfg).eval()
    if family == "bert":
        cls = (transformers.BertForSequenceClassification if task == "sequence-classification"
               else transformers.BertForMaskedLM)
    else:
        cls = transformers.AutoModelForCausalLM
    model = cls.from_config(cfg) if cls is transformers.AutoModelForCausalLM else cls(cfg)
    return model.eval()


def real_assets_available() -> bool:
    import lmcompress.data
    import lmcompress.models  # noqa: F401  (the built-in assets register on import)
    from lmcompress.core import assets

    return all(a.ready for a in assets.ASSETS.values())


# Integration tests need the real assets, which `make test` fetches first. Without them (a bare
# `pytest` on a machine that never ran `lmcompress assets`) they are skipped with the reason.
integration = pytest.mark.skipif(
    not real_assets_available() and not os.environ.get("CI"),
    reason="built-in assets not fetched; run `lmcompress assets` (make test does)",
)


def tiny_lm_or_classifier(family: str, **kw):
    """A tiny causal LM (llama, gpt2) or, for bert, a sequence classifier: every family with a loss."""
    return tiny_model(family, task="sequence-classification" if family == "bert" else None, **kw)


def tiny_budget(name: str, sets: tuple[str, ...] = (), **top):
    """The shipped recipe `name` (with or without .yaml), after the `--set` overrides `sets`, at 2 training
    steps per stage, small batches and short evaluations (the recipes' `bf16: auto` runs fp32 where bf16 is
    slower); `top` overrides top-level fields."""
    from lmcompress.core.yamlfile import read_yaml_mapping
    from lmcompress.recipe import Recipe
    from lmcompress.recipe.schema import apply_override

    doc = read_yaml_mapping(RECIPES / (name if name.endswith(".yaml") else f"{name}.yaml"), "recipe")
    for item in sets:
        apply_override(doc, item)
    data = doc.data
    data.update(top)
    for stage in data["stages"]:
        if "steps" in stage:
            stage.update(steps=2, batch_size=2, grad_accum=1, warmup_steps=0, eval_every=0, eval_batches=1,
                         checkpoint_every=0)
        if stage["stage"] == "evaluate" and "perplexity" in stage.get("metrics", []):
            stage["max_tokens"] = 256
    return Recipe.parse(data)


WORDS = ("the union is strong and the people are free to work for peace trade law war tax school "
         "farm bank road army navy state nation year").split()


def tiny_tokenizer():
    """A real fast tokenizer built offline: whitespace words over a VOCAB-sized word-level vocabulary
    (special tokens 0..3, then WORDS, then filler), so corpora of WORDS tokenize without a hub."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + WORDS + [f"w{i}" for i in range(VOCAB - 4 - len(WORDS))])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>", unk_token="<unk>")


def bpe_tokenizer(vocab: int = 320):
    """A tiny byte-level BPE tokenizer (GPT-2 / SmolLM style, what GGUF export writes) trained on a few
    sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = ["The quick brown fox jumps over the lazy dog.", "State of the Union addresses, 1790 to 2016.",
             "Compression makes models small and fast with two-bit or ternary weights."] * 10
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")


def saved_model(model, folder: Path) -> Path:
    """`model` saved with the tiny tokenizer in `folder`: a model folder as a user would point a command at."""
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def write_word_corpus(path: Path, documents: int = 40, words: int = 120, seed: int = 0) -> Path:
    """A .jsonl corpus of `documents` random-word texts over WORDS (one `text` per line)."""
    import json
    import random

    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(documents):
            f.write(json.dumps({"id": f"d{i}", "text": " ".join(rng.choice(WORDS) for _ in range(words))}) + "\n")
    return path


def run_two_processes(script: str | Path, out_dir: Path) -> list[dict]:
    """Run `script out_dir` under torchrun with two CPU processes (gloo) and return what each rank wrote
    to `out_dir/rank<r>.json`. (`accelerate launch --cpu --num_processes 2` silently runs one.)"""
    import json
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
    proc = subprocess.run([*torchrun, str(script), str(out_dir)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]


def logits(model, ids):
    """The model's logits for token ids, without gradients."""
    with torch.no_grad():
        return model(input_ids=ids).logits


def relative_error(model_a, model_b, ids) -> float:
    """Largest logit difference of two models on `ids`, relative to the spread of the first's logits."""
    a, b = logits(model_a, ids), logits(model_b, ids)
    return float((a - b).abs().max() / a.std())


def random_lm_batches(n: int, rows: int = 4, length: int = 24, seed: int = 0) -> list[dict]:
    """`n` calibration batches of random token ids (no padding), labels = the ids: what PTQ and block-wise
    reconstruction take."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (rows, length), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return out


def run_on_random_blocks(out_dir: Path, recipe, student, blocks: int, length: int, teacher=None):
    """A recipe `Run` holding `student` (and `teacher`) whose training corpus is `blocks` random token blocks
    of `length` (seeded), so a stage can run without reading a corpus."""
    import datasets

    from lmcompress.recipe.base import Run

    run = Run(recipe=recipe, out_dir=out_dir)
    run.student, run.teacher = student, teacher
    ids = torch.randint(3, VOCAB, (blocks, length), generator=torch.Generator().manual_seed(0)).tolist()
    rows = datasets.Dataset.from_dict({"input_ids": ids})
    run.lm_blocks = lambda split, block_size=None: rows if split == "train" else None
    return run
