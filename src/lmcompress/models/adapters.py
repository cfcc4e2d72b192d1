"""One adapter per architecture family: the only place that knows where things live inside a model.

Everything else in lmcompress asks an adapter for "the blocks", "block 3's q projection" or "the kind of
module `model.layers.2.mlp.up_proj`" and never checks `model_type` itself.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lmcompress.core.errors import RecipeError, UnsupportedArchitectureError

# Module kinds used by patterns in recipes (quantize, factorize) and by size accounting.
KINDS = ("embeddings", "attention", "mlp", "head", "norm", "other")


@dataclass
class QKV:
    """Where a block's q/k/v come from.

    For separate projections `q`, `k`, `v` are modules whose outputs are the projections. For GPT-2's
    fused `c_attn`, `fused` is that module and its output is [q | k | v] along the last dimension.
    """

    q: nn.Module | None = None
    k: nn.Module | None = None
    v: nn.Module | None = None
    fused: nn.Module | None = None


@dataclass
class WidthParts:
    """A block's modules by the role they play in its widths (what width pruning slices): `q`, `k`, `v`
    write head rows and `o` reads head columns; `mlp_in` write and `mlp_out` reads the intermediate channels;
    every one of them reads or writes the hidden state, as the `norms` scale it."""

    q: nn.Module
    k: nn.Module
    v: nn.Module
    o: nn.Module
    mlp_in: list[nn.Module]
    mlp_out: nn.Module
    norms: list[nn.Module]
    # an encoder-decoder's decoder block: its cross-attention's q, k, v (head rows) and o (head columns)
    cross: tuple[nn.Module, nn.Module, nn.Module, nn.Module] | None = None
    # a table with one column per head of this block's self-attention (T5's relative position bias, held by
    # a stack's first block)
    head_table: nn.Module | None = None


@dataclass
class DecodeBlock:
    """One block as the lean decode step computes it: x += o(attn(rope(q, k), v)) of attn_norm(x), then
    x += down(silu(gate(h)) * up(h)) of h = mlp_norm(x). The modules are the model's own (linears in any
    inference form; RMS norms with `weight` and `variance_epsilon`)."""

    attn_norm: nn.Module
    q: nn.Module
    k: nn.Module
    v: nn.Module
    o: nn.Module
    mlp_norm: nn.Module
    gate: nn.Module
    up: nn.Module
    down: nn.Module


@dataclass
class DecodeSpec:
    """A LLaMA-family decoder as the lean decode path (`lmcompress.infer.lean`) runs it: pre-norm RMSNorm
    blocks, rotary positions in transformers' rotate-half form, grouped-query attention scaled by
    head_dim^-0.5, SwiGLU MLP, final norm, LM head. `rotary(n)` gives the (cos, sin) tables [n, head_dim]
    of positions 0..n-1 from the model's own rotary module (any rope scaling it applies included)."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    blocks: list[DecodeBlock]
    embeddings: nn.Module
    final_norm: nn.Module
    head: nn.Module
    rotary: Callable[[int], tuple[torch.Tensor, torch.Tensor]]
    max_positions: int | None = None


class ArchAdapter:
    """Uniform view of a Hugging Face transformer. Subclasses fill in the attribute paths."""

    family: str = ""
    model_types: tuple[str, ...] = ()
    causal: bool = True
    # Config attribute holding the MLP width, and whether the config has num_key_value_heads (GQA);
    # used to build narrower students from a teacher's config.
    intermediate_size_attr: str = "intermediate_size"
    supports_kv_heads: bool = False
    # The block stacks the model has, by name. Decoder-only and encoder-only models have one; an adapter
    # of an encoder-decoder model views one stack at a time (`on("decoder")`).
    stacks: tuple[str, ...] = ("decoder",)
    # Whether a block can be skipped in place by handing its input on (`models.blocks.skipping_blocks`): its
    # output is the hidden states alone and no later block reads anything it computes.
    skippable_blocks: bool = True
    # Whether the config needs hidden_size to be a multiple of the head count (width pruning keeps it so).
    heads_divide_hidden: bool = True
    # Whether width pruning can drop attention heads: the config can describe fewer heads of the same width.
    cuts_heads: bool = True

    def __init__(self, model: nn.Module, stack: str | None = None):
        self.model = model
        self.config = model.config
        self.stack = stack if stack is not None else (self.stacks[0] if len(self.stacks) == 1 else None)
        if self.stack is not None and self.stack not in self.stacks:
            raise UnsupportedArchitectureError(
                f"{self.family} models have block stack(s) {', '.join(self.stacks)}; there is no {stack!r}")

    def on(self, stack: str) -> ArchAdapter:
        """This adapter's view of block stack `stack` (`encoder` or `decoder`) of the same model."""
        return self if stack == self.stack else type(self)(self.model, stack)

    @property
    def is_encoder_decoder(self) -> bool:
        return len(self.stacks) > 1

    @property
    def forward_blocks(self) -> list[nn.Module]:
        """Every block of the model in the order its forward runs them (an encoder's before its decoder's);
        a block's place in this list is its index in capture needs (`distill.capture`)."""
        return [block for stack in self.stacks for block in self.on(stack).blocks]

    def stack_start(self, stack: str) -> int:
        """Where stack `stack`'s first block sits in `forward_blocks`."""
        names = list(self.stacks)
        return sum(self.on(name).num_layers for name in names[:names.index(stack)])

    @property
    def no_cache(self) -> dict[str, bool]:
        """The forward keyword that turns the KV cache off, for models that keep one (none for encoders)."""
        return {"use_cache": False} if self.causal or self.is_encoder_decoder else {}

    # --- structure -------------------------------------------------------------------------------
    @property
    def base(self) -> nn.Module:
        """The bare transformer (no task head)."""
        raise NotImplementedError

    @property
    def blocks(self) -> nn.ModuleList:
        raise NotImplementedError

    def set_blocks(self, blocks: nn.ModuleList) -> None:
        raise NotImplementedError

    def keep_blocks(self, indices: list[int]) -> None:
        """Keep only blocks `indices` (in order), renumbered so generation's KV cache still lines up, and
        make the config say so (save/load and generate keep working)."""
        kept = nn.ModuleList(self.blocks[i] for i in indices)
        for new_index, block in enumerate(kept):
            for sub in block.modules():  # HF attention modules index the KV cache by their `layer_idx`
                if hasattr(sub, "layer_idx"):
                    sub.layer_idx = new_index
        self.set_blocks(kept)
        self.keep_config_layers(self.config, indices)

    @property
    def embeddings(self) -> nn.Embedding:
        """Token embedding table."""
        raise NotImplementedError

    @property
    def head(self) -> nn.Module | None:
        """Output head: the LM head for decoders, the classifier for encoders with a task head."""
        return getattr(self.model, "lm_head", None) or getattr(self.model, "classifier", None)

    def attention(self, block: nn.Module) -> nn.Module:
        raise NotImplementedError

    def qkv(self, block: nn.Module) -> QKV:
        raise NotImplementedError

    # --- sizes -----------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return getattr(self.config, "num_key_value_heads", None) or self.num_heads

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def ties_embeddings(self) -> bool:
        """Whether the output head shares the input embedding table."""
        return bool(getattr(self.config, "tie_word_embeddings", False))

    @property
    def max_positions(self) -> int | None:
        """Longest sequence the model takes (None when its positions are unbounded, e.g. rotary-only)."""
        return getattr(self.config, "max_position_embeddings", None)

    @property
    def head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or self.hidden_size // self.num_heads

    # --- names -----------------------------------------------------------------------------------
    def module_kind(self, name: str, module: nn.Module) -> str:
        """Classify a named module into one of KINDS (used by recipe patterns and size accounting)."""
        raise NotImplementedError

    def scaling_pairs(self, block: nn.Module) -> list[tuple[nn.Module, list[nn.Module]]]:
        """(linear, [linears]) where the first linear's output rows reach the others' input channels one to
        one, so scaling one by 1/s and the others by s leaves the block unchanged (AWQ). Norm -> linear
        pairs are found by following the forward; these are the linear -> linear ones."""
        return []

    @property
    def blocks_prefix(self) -> str:
        """Qualified name of the block list inside `self.model`."""
        for name, module in self.model.named_modules():
            if module is self.blocks:
                return name
        raise RuntimeError("block list not found among the model's modules")

    # --- configs ---------------------------------------------------------------------------------
    @staticmethod
    def config_layers(config) -> int:
        """Number of blocks a config describes."""
        return config.num_hidden_layers

    @staticmethod
    def keep_config_layers(config, indices: list[int]) -> None:
        """Make `config` describe blocks `indices` of the model it described (depth and per-layer types)."""
        config.num_hidden_layers = len(indices)
        if getattr(config, "layer_types", None):
            config.layer_types = [config.layer_types[i] for i in indices]

    def resized_config(self, layers: int | None = None, hidden_size: int | None = None,
                       intermediate_size: int | None = None, num_heads: int | None = None,
                       num_kv_heads: int | None = None):
        """A copy of the model's config with fewer layers and/or narrower widths (same head_dim unless the
        heads change); the widths not given follow the hidden size."""
        config = copy.deepcopy(self.config)
        hidden = hidden_size or self.hidden_size
        heads = num_heads or (self.num_heads if hidden_size is None else max(1, hidden // self.head_dim))
        if hidden % heads:
            raise RecipeError(f"student: hidden_size {hidden} is not divisible by num_heads {heads}")
        kv_heads = num_kv_heads or min(self.num_kv_heads, heads)
        if heads % kv_heads:
            raise RecipeError(f"student: num_heads {heads} is not a multiple of num_kv_heads {kv_heads}")
        if num_kv_heads is not None and not self.supports_kv_heads:
            raise RecipeError(f"student.num_kv_heads: {self.family} models have no grouped-query attention")
        config.num_hidden_layers = layers or self.num_layers
        config.hidden_size = hidden
        config.num_attention_heads = heads
        if self.supports_kv_heads:
            config.num_key_value_heads = kv_heads
        if getattr(config, "head_dim", None) is not None:
            config.head_dim = hidden // heads
        if intermediate_size is not None:
            setattr(config, self.intermediate_size_attr, intermediate_size)
        elif hidden_size is not None:
            teacher_inter = getattr(config, self.intermediate_size_attr, None) or 4 * self.hidden_size
            setattr(config, self.intermediate_size_attr, teacher_inter * hidden // self.hidden_size)
        return config

    # --- widths (width pruning) ---------------------------------------------------------------------
    def width_parts(self, block: nn.Module) -> WidthParts:
        """Block `block`'s modules by role in its widths."""
        raise UnsupportedArchitectureError(f"width pruning supports LLaMA-layout models; this is {self.family}")

    @property
    def final_norm(self) -> nn.Module | None:
        """The norm after the last block (it scales the hidden state too)."""
        return None

    @property
    def intermediate_size(self) -> int | None:
        """The MLP width (None where the config leaves it to a default, as GPT-2's n_inner)."""
        return getattr(self.config, self.intermediate_size_attr, None)

    def set_widths(self, num_heads: int, num_kv_heads: int, intermediate_size: int, hidden_size: int) -> None:
        """Make the config and every block's attention say the widths the weights now have (head_dim kept)."""
        raise UnsupportedArchitectureError(f"width pruning supports LLaMA-layout models; this is {self.family}")

    # --- GGUF (llama.cpp) --------------------------------------------------------------------------
    gguf_architecture: str | None = None  # llama.cpp's name for the architecture; None: no GGUF export

    def gguf_tensor_name(self, hf_name: str) -> str:
        """llama.cpp's name for the model tensor `hf_name` (`model.layers.0.self_attn.q_proj.weight` ->
        `blk.0.attn_q.weight`)."""
        raise UnsupportedArchitectureError(f"GGUF export supports LLaMA-family models; this is {self.family}")

    def decode_spec(self) -> DecodeSpec:
        """The model as the lean decode path runs it; UnsupportedArchitectureError saying why when it cannot."""
        raise UnsupportedArchitectureError(f"lean decoding runs LLaMA-family decoders; {self.family or 'this'} "
                                           "models decode through transformers' generate")

    def gguf_metadata(self) -> dict[str, float | int]:
        """The llama.cpp hyper-parameters this config implies beyond depth, widths and heads."""
        raise UnsupportedArchitectureError(f"GGUF export supports LLaMA-family models; this is {self.family}")

    def gguf_row_order(self, module_name: str, rows: int) -> torch.Tensor | None:
        """The order llama.cpp expects the output rows of module `module_name` in, or None to keep them."""
        return None


def weight_is_transposed(module: nn.Module) -> bool:
    """True for HF's GPT-2 `Conv1D`: a linear layer whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D"


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or weight_is_transposed(module)


def is_sequence_classifier(model: nn.Module) -> bool:
    """True for a Hugging Face `*ForSequenceClassification` model (a transformer with a task head)."""
    return type(model).__name__.endswith("ForSequenceClassification")


class LlamaAdapter(ArchAdapter):
    """LLaMA-layout decoders: LLaMA, SmolLM2, Mistral, Qwen2/3, Gemma, OLMo, Granite, and any other model
    whose modules follow the layout (see `layout_mismatch`), whatever its `model_type` says."""

    family = "llama"
    model_types = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "granite")  # known to fit
    supports_kv_heads = True

    @staticmethod
    def layout_mismatch(model: nn.Module) -> str | None:
        """None when `model` has the LLaMA layout — `model.layers[i].self_attn.{q,k,v,o}_proj` (or a fused
        `qkv_proj` with `o_proj`), an `mlp` in every block, `model.embed_tokens` — else the first module that
        does not fit."""
        base = getattr(model, "model", model)
        blocks = getattr(base, "layers", None)
        if not isinstance(blocks, nn.ModuleList) or not len(blocks):
            return "no decoder block list at `model.layers`"
        if not isinstance(getattr(base, "embed_tokens", None), nn.Embedding):
            return "no token embedding at `model.embed_tokens`"
        prefix = "model." if base is not model else ""
        for i, block in enumerate(blocks):
            attention, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
            if attention is None:
                return f"{prefix}layers.{i} has no `self_attn` (it has: {', '.join(n for n, _ in block.named_children())})"
            # By name, not class: once quantized or factorized, the projections are lmcompress modules.
            projections = ("qkv_proj", "o_proj") if hasattr(attention, "qkv_proj") else ("q_proj", "k_proj", "v_proj", "o_proj")
            missing = [n for n in projections if not isinstance(getattr(attention, n, None), nn.Module)]
            if missing:
                found = ", ".join(n for n, _ in attention.named_children())
                return f"{prefix}layers.{i}.self_attn has no {'/'.join(missing)} (it has: {found})"
            if not isinstance(mlp, nn.Module) or not any(True for _ in mlp.children()):
                return f"{prefix}layers.{i} has no `mlp` (it has: {', '.join(n for n, _ in block.named_children())})"
        return None

    @property
    def base(self) -> nn.Module:
        return self.model.model if hasattr(self.model, "model") else self.model

    @property
    def blocks(self) -> nn.ModuleList:
        return self.base.layers

    def set_blocks(self, blocks: nn.ModuleList) -> None:
        self.base.layers = blocks

    @property
    def embeddings(self) -> nn.Embedding:
        return self.base.embed_tokens

    def attention(self, block: nn.Module) -> nn.Module:
        return block.self_attn

    def qkv(self, block: nn.Module) -> QKV:
        a = block.self_attn
        if hasattr(a, "qkv_proj"):  # fused [q | k | v] (Phi-3 style), GQA widths
            return QKV(fused=a.qkv_proj)
        return QKV(q=a.q_proj, k=a.k_proj, v=a.v_proj)

    def width_parts(self, block: nn.Module) -> WidthParts:
        a, mlp = block.self_attn, block.mlp
        if hasattr(a, "qkv_proj") or not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
            raise UnsupportedArchitectureError("width pruning needs separate q/k/v and gate/up/down projections; "
                                               "this model fuses them")
        # Every norm child of the block scales the hidden state (Gemma 2 has four, OLMo 2 two after the
        # sublayers); norms inside the attention (Qwen3's q/k norms) act on head_dim and stay.
        norms = [m for n, m in block.named_children() if n.endswith("norm")]
        if not norms:
            raise UnsupportedArchitectureError("width pruning: the blocks have no norm children; this layout is not "
                                               "supported")
        return WidthParts(q=a.q_proj, k=a.k_proj, v=a.v_proj, o=a.o_proj, mlp_in=[mlp.gate_proj, mlp.up_proj],
                          mlp_out=mlp.down_proj, norms=norms)

    @property
    def final_norm(self) -> nn.Module | None:
        return self.base.norm

    def set_widths(self, num_heads: int, num_kv_heads: int, intermediate_size: int, hidden_size: int) -> None:
        config = self.config
        config.head_dim = self.head_dim  # explicit: hidden_size // num_heads no longer gives it
        config.num_attention_heads, config.num_key_value_heads = num_heads, num_kv_heads
        config.intermediate_size, config.hidden_size = intermediate_size, hidden_size
        for block in self.blocks:
            block.self_attn.num_key_value_groups = num_heads // num_kv_heads  # eager/sdpa repeat k/v by it
        scale = getattr(self.embeddings, "embed_scale", None)  # Gemma scales embeddings by sqrt(hidden_size)
        if isinstance(scale, torch.Tensor):
            scale.fill_(hidden_size ** 0.5)  # what a reload computes from the new config

    # llama.cpp's architecture per model type, as its convert_hf_to_gguf.py chooses. Only these: a model type
    # with the LLaMA module tree can still differ in numerics llama.cpp's "llama" does not have (Gemma's
    # embedding scale and norm offset, OLMo 2's norm placement, Granite's multipliers), so GGUF export is by
    # name, not by structure.
    GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3"}

    @property
    def gguf_architecture(self) -> str:
        model_type = getattr(self.config, "model_type", None)
        arch = self.GGUF_ARCHITECTURES.get(model_type)
        if arch is None:
            raise UnsupportedArchitectureError(
                f"GGUF export writes the llama.cpp architectures of model types "
                f"{', '.join(sorted(self.GGUF_ARCHITECTURES))}; {model_type!r} has the LLaMA module layout but "
                "may compute differently from all of them, so it is not written as one")
        return arch

    def gguf_metadata(self) -> dict[str, float | int]:
        config = self.config
        params = getattr(config, "rope_parameters", None) or {}
        scaling = getattr(config, "rope_scaling", None) or {}
        kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
        if kind != "default":
            raise UnsupportedArchitectureError(f"GGUF export: rope type {kind!r} is not supported (default only)")
        theta = params.get("rope_theta", getattr(config, "rope_theta", None))
        return {"context_length": config.max_position_embeddings, "feed_forward_length": config.intermediate_size,
                "rope_freq_base": float(theta if theta is not None else 10000.0),
                "layer_norm_rms_eps": config.rms_norm_eps}

    def gguf_tensor_name(self, hf_name: str) -> str:
        if not hasattr(self, "_gguf_names"):
            import gguf  # only GGUF export needs the gguf package's name tables

            arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == self.gguf_architecture)
            self._gguf_names = gguf.get_tensor_name_map(arch, self.num_layers)
        found = self._gguf_names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if found is None:
            raise UnsupportedArchitectureError(f"GGUF export: no llama.cpp name for tensor {hf_name!r}")
        return found

    def gguf_row_order(self, module_name: str, rows: int) -> torch.Tensor | None:
        # llama.cpp's "llama" rotary embedding pairs adjacent q/k rows; HF's pairs rows half a head apart.
        # Its qwen2/qwen3/phi3 use HF's (NeoX) pairing: rows stay.
        if self.gguf_architecture != "llama":
            return None
        leaf = module_name.rsplit(".", 1)[-1]
        heads = {"q_proj": self.num_heads, "k_proj": self.num_kv_heads}.get(leaf)
        if heads is None:
            return None
        return torch.arange(rows).reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(rows)

    # Model types whose blocks compute exactly what `DecodeSpec` describes (Qwen3's q/k norms, Gemma's norm
    # offset and embedding scale, OLMo 2's norm placement and Granite's multipliers compute otherwise).
    LEAN_DECODE_TYPES = ("llama", "mistral", "qwen2")

    def decode_spec(self) -> DecodeSpec:
        config, base = self.config, self.base
        model_type = getattr(config, "model_type", None)
        if model_type not in self.LEAN_DECODE_TYPES:
            raise UnsupportedArchitectureError(f"lean decoding runs model types {', '.join(self.LEAN_DECODE_TYPES)}; "
                                               f"{model_type!r} decodes through transformers' generate")
        if getattr(config, "hidden_act", "silu") != "silu":
            raise UnsupportedArchitectureError(f"lean decoding: activation {config.hidden_act!r} (silu only)")
        window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
        eps = float(config.rms_norm_eps)
        blocks = []
        for block in self.blocks:
            attention, mlp = block.self_attn, block.mlp
            if hasattr(attention, "qkv_proj") or not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
                raise UnsupportedArchitectureError("lean decoding needs separate q/k/v and gate/up/down projections")
            norms = (block.input_layernorm, block.post_attention_layernorm)
            if norms[0] is norms[1] or any(getattr(n, "variance_epsilon", eps) != eps for n in norms):
                raise UnsupportedArchitectureError("lean decoding needs two RMS norms per block with the config's epsilon")
            blocks.append(DecodeBlock(attn_norm=block.input_layernorm, q=attention.q_proj, k=attention.k_proj,
                                      v=attention.v_proj, o=attention.o_proj, mlp_norm=block.post_attention_layernorm,
                                      gate=mlp.gate_proj, up=mlp.up_proj, down=mlp.down_proj))
        rotary = base.rotary_emb

        def tables(n: int) -> tuple[torch.Tensor, torch.Tensor]:
            probe = torch.zeros(1, dtype=torch.float32)
            cos, sin = rotary(probe, torch.arange(n)[None])
            return cos[0].float(), sin[0].float()

        limits = [p for p in (window, config.max_position_embeddings) if p]
        return DecodeSpec(hidden_size=self.hidden_size, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                          head_dim=self.head_dim, intermediate_size=self.intermediate_size,
                          norm_eps=eps, blocks=blocks, embeddings=self.embeddings,
                          final_norm=self.final_norm, head=self.model.get_output_embeddings(), rotary=tables,
                          max_positions=min(limits) if limits else None)

    def scaling_pairs(self, block: nn.Module) -> list[tuple[nn.Module, list[nn.Module]]]:
        pairs = []
        mlp, attention = block.mlp, block.self_attn
        # down_proj reads act(gate_proj(x)) * up_proj(x): elementwise in up's output rows.
        if isinstance(getattr(mlp, "up_proj", None), nn.Module) and isinstance(getattr(mlp, "down_proj", None), nn.Module):
            pairs.append((mlp.up_proj, [mlp.down_proj]))
        # o_proj reads the heads' weighted sums of v: one to one only without grouped kv heads.
        if self.num_kv_heads == self.num_heads and hasattr(attention, "v_proj"):
            pairs.append((attention.v_proj, [attention.o_proj]))
        return pairs

    def module_kind(self, name: str, module: nn.Module) -> str:
        if name.endswith("embed_tokens"):
            return "embeddings"
        if name == "lm_head" or name.endswith(".score") or name == "score":
            return "head"
        if ".self_attn." in name:
            return "attention"
        if ".mlp." in name:
            return "mlp"
        if "norm" in name.rsplit(".", 1)[-1]:
            return "norm"
        return "other"


class GPT2Adapter(ArchAdapter):
    """GPT-2 family: fused `c_attn` (q|k|v) and `Conv1D` linears with transposed weights."""

    family = "gpt2"
    model_types = ("gpt2",)
    intermediate_size_attr = "n_inner"  # None means 4 * n_embd

    @property
    def base(self) -> nn.Module:
        return self.model.transformer if hasattr(self.model, "transformer") else self.model

    @property
    def blocks(self) -> nn.ModuleList:
        return self.base.h

    def set_blocks(self, blocks: nn.ModuleList) -> None:
        self.base.h = blocks

    @property
    def embeddings(self) -> nn.Embedding:
        return self.base.wte

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads

    def attention(self, block: nn.Module) -> nn.Module:
        return block.attn

    def qkv(self, block: nn.Module) -> QKV:
        return QKV(fused=block.attn.c_attn)

    def module_kind(self, name: str, module: nn.Module) -> str:
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("wte", "wpe"):
            return "embeddings"
        if name == "lm_head" or leaf == "score":
            return "head"
        if ".attn." in name:
            return "attention"
        if ".mlp." in name:
            return "mlp"
        if leaf.startswith("ln"):
            return "norm"
        return "other"


class BertAdapter(ArchAdapter):
    """BERT family encoders (BERT, MiniLM, RoBERTa-style): separate query/key/value, bidirectional."""

    family = "bert"
    model_types = ("bert", "roberta", "xlm-roberta")
    causal = False
    stacks = ("encoder",)

    @property
    def base(self) -> nn.Module:
        for attr in ("bert", "roberta"):
            if hasattr(self.model, attr):
                return getattr(self.model, attr)
        return self.model

    @property
    def blocks(self) -> nn.ModuleList:
        return self.base.encoder.layer

    def set_blocks(self, blocks: nn.ModuleList) -> None:
        self.base.encoder.layer = blocks

    @property
    def embeddings(self) -> nn.Embedding:
        return self.base.embeddings.word_embeddings

    def attention(self, block: nn.Module) -> nn.Module:
        return block.attention

    def qkv(self, block: nn.Module) -> QKV:
        s = block.attention.self
        return QKV(q=s.query, k=s.key, v=s.value)

    def module_kind(self, name: str, module: nn.Module) -> str:
        leaf = name.rsplit(".", 1)[-1]
        dotted = f".{name}."  # a bare BertModel's names start at its own children (`embeddings.`, `pooler.`)
        if ".embeddings." in dotted and isinstance(module, nn.Embedding):
            return "embeddings"
        if leaf == "classifier" or ".pooler." in dotted or name.startswith("cls."):
            return "head"
        if "LayerNorm" in name or "layernorm" in leaf.lower():
            return "norm"
        if ".attention." in dotted:
            return "attention"
        if ".intermediate." in dotted or (".output." in dotted and ".attention." not in dotted):
            return "mlp"
        return "other"


class Seq2SeqAdapter(ArchAdapter):
    """Encoder-decoder models: an encoder stack and a decoder stack sharing one token table. The adapter views
    one stack at a time (`get_adapter(model, "decoder")`, `adapter.on("encoder")`): `blocks`, `num_layers`,
    `num_heads`, `causal` and the config's layer counts are that stack's. Asked for blocks without a stack, it
    says the model has two."""

    stacks = ("encoder", "decoder")
    # config attribute per stack: layer count, attention heads, MLP width
    layers_attr: dict[str, str] = {}
    heads_attr: dict[str, str] = {}
    ffn_attr: dict[str, str] = {}

    @property
    def shares_stack_widths(self) -> bool:
        """Whether one config attribute holds both stacks' MLP width (then they are cut together)."""
        return len(set(self.ffn_attr.values())) == 1

    # T5 can lose heads (d_kv is its own field); BART cannot: it derives head_dim from d_model / heads, so
    # fewer heads would be wider ones.
    cuts_heads = False

    def set_widths(self, num_heads: int, num_kv_heads: int, intermediate_size: int, hidden_size: int) -> None:
        """This stack's MLP width and (where the config can say it) head count in the config and its attention
        modules; an encoder-decoder's hidden width stays."""
        heads_kept = (num_heads, num_kv_heads) == (self.num_heads, self.num_kv_heads)
        if hidden_size != self.hidden_size or not (heads_kept or self.cuts_heads and num_heads == num_kv_heads):
            what = "MLP channels and heads" if self.cuts_heads else "MLP channels"
            raise UnsupportedArchitectureError(f"{self.family}: width pruning cuts the {what} only; the config "
                                               "cannot describe narrower heads or hidden states")
        self._stack()
        setattr(self.config, self.ffn_attr[self.stack], intermediate_size)
        setattr(self.config, self.heads_attr[self.stack], num_heads)
        if self.cuts_heads:  # every time: T5's config says both stacks' heads, set by the first stack's call
            for block in self.blocks:
                for attention in (self.attention(block), self.cross_attention(block)):
                    if attention is not None:
                        self.set_attention_heads(attention, num_heads)

    def set_attention_heads(self, attention: nn.Module, num_heads: int) -> None:
        """Make one attention module say it has `num_heads` heads (of unchanged width)."""
        raise NotImplementedError

    @property
    def causal(self) -> bool:
        return self.stack == "decoder"

    def _stack(self) -> nn.Module:
        if self.stack is None:
            raise UnsupportedArchitectureError(
                f"{self.family} is an encoder-decoder model with two block stacks (encoder, decoder); this step "
                "walks one block list and needs a stack named (`stack: encoder` or `stack: decoder`)")
        return getattr(self.base, self.stack)

    @property
    def embeddings(self) -> nn.Embedding:
        return self.base.shared

    @property
    def head(self) -> nn.Module | None:
        return getattr(self.model, "lm_head", None) or getattr(self.model, "classification_head", None)

    def cross_attention(self, block: nn.Module) -> nn.Module | None:
        """A decoder block's attention over the encoder's output (None in the encoder)."""
        raise NotImplementedError

    def encoder_readers(self, block: nn.Module) -> list[nn.Module]:
        """The linears of a decoder block that read the encoder's output (its cross-attention's k and v): their
        inputs are over the source's positions, not the target's."""
        raise NotImplementedError

    @property
    def num_heads(self) -> int:
        return getattr(self.config, self.heads_attr[self.stack or "encoder"])

    @property
    def intermediate_size(self) -> int | None:
        return getattr(self.config, self.ffn_attr[self.stack or "encoder"])

    def config_layers(self, config) -> int:
        self._stack()  # names the missing stack
        return getattr(config, self.layers_attr[self.stack])

    def keep_config_layers(self, config, indices: list[int]) -> None:
        self._stack()
        setattr(config, self.layers_attr[self.stack], len(indices))

    def resized_config(self, layers: int | None = None, hidden_size: int | None = None,
                       intermediate_size: int | None = None, num_heads: int | None = None,
                       num_kv_heads: int | None = None):
        if any(v is not None for v in (hidden_size, intermediate_size, num_heads, num_kv_heads)):
            raise UnsupportedArchitectureError(f"student widths: {self.family} students keep the teacher's "
                                               "widths (set only the layers of a stack)")
        config = copy.deepcopy(self.config)
        if layers is not None:
            self._stack()
            setattr(config, self.layers_attr[self.stack], layers)
        return config

    def embedding_scale(self, module: nn.Module) -> float:
        """The factor module `module`, which reads the token table, multiplies the rows it looks up by."""
        return 1.0


class BartAdapter(Seq2SeqAdapter):
    """BART family (BART, mBART, PEGASUS-style): `model.{encoder,decoder}.layers`, q/k/v/out_proj self-attention,
    `encoder_attn` cross-attention in the decoder, fc1/fc2 MLPs, learned positions."""

    family = "bart"
    model_types = ("bart", "mbart")
    layers_attr = {"encoder": "encoder_layers", "decoder": "decoder_layers"}
    heads_attr = {"encoder": "encoder_attention_heads", "decoder": "decoder_attention_heads"}
    ffn_attr = {"encoder": "encoder_ffn_dim", "decoder": "decoder_ffn_dim"}

    @property
    def base(self) -> nn.Module:
        return self.model.model if hasattr(self.model, "model") else self.model

    @property
    def blocks(self) -> nn.ModuleList:
        return self._stack().layers

    def set_blocks(self, blocks: nn.ModuleList) -> None:
        self._stack().layers = blocks

    def attention(self, block: nn.Module) -> nn.Module:
        return block.self_attn

    def cross_attention(self, block: nn.Module) -> nn.Module | None:
        return getattr(block, "encoder_attn", None)

    def encoder_readers(self, block: nn.Module) -> list[nn.Module]:
        cross = self.cross_attention(block)
        return [] if cross is None else [cross.k_proj, cross.v_proj]

    def qkv(self, block: nn.Module) -> QKV:
        a = block.self_attn
        return QKV(q=a.q_proj, k=a.k_proj, v=a.v_proj)

    def width_parts(self, block: nn.Module) -> WidthParts:
        a = block.self_attn
        norms = [m for n, m in block.named_children() if n.endswith("layer_norm")]
        return WidthParts(q=a.q_proj, k=a.k_proj, v=a.v_proj, o=a.out_proj, mlp_in=[block.fc1], mlp_out=block.fc2,
                          norms=norms)

    @property
    def max_positions(self) -> int | None:
        return self.config.max_position_embeddings

    def embedding_scale(self, module: nn.Module) -> float:
        return float(getattr(module, "embed_scale", None) or 1.0)  # BartScaledWordEmbedding: sqrt(d_model) or 1

    def module_kind(self, name: str, module: nn.Module) -> str:
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("shared", "embed_tokens"):
            return "embeddings"
        if leaf == "embed_positions":
            return "other"  # learned positions looked up with an offset by their own forward: kept as they are
        if name == "lm_head" or name.startswith("classification_head"):
            return "head"
        if ".self_attn." in name or ".encoder_attn." in name:
            return "attention"
        if leaf in ("fc1", "fc2"):
            return "mlp"
        if "norm" in leaf:
            return "norm"
        return "other"


class T5Adapter(Seq2SeqAdapter):
    """T5 family (T5, T5 v1.1, FLAN-T5, mT5): `{encoder,decoder}.block[i].layer = [self-attention,
    (cross-attention,) FFN]`, relative position bias held by each stack's first block."""

    family = "t5"
    model_types = ("t5", "mt5")
    skippable_blocks = False  # blocks return (states, position biases); the first computes the biases all read
    cuts_heads = True  # d_kv is its own field; the heads of a stack's self-attention go as one set (see below)
    heads_divide_hidden = False  # inner_dim = num_heads * d_kv need not be d_model
    layers_attr = {"encoder": "num_layers", "decoder": "num_decoder_layers"}
    heads_attr = {"encoder": "num_heads", "decoder": "num_heads"}
    ffn_attr = {"encoder": "d_ff", "decoder": "d_ff"}

    @property
    def base(self) -> nn.Module:
        return self.model

    @property
    def blocks(self) -> nn.ModuleList:
        return self._stack().block

    def set_blocks(self, blocks: nn.ModuleList) -> None:
        self._stack().block = blocks

    def keep_blocks(self, indices: list[int]) -> None:
        depths = {name: self.on(name).num_layers for name in self.stacks}
        self._stack()
        depths[self.stack] = len(indices)
        if depths["decoder"] > depths["encoder"]:
            # transformers sizes a T5 decoder's KV cache by `num_layers`, the encoder's depth: generate fails
            raise UnsupportedArchitectureError(
                f"t5: keeping {depths['encoder']} encoder and {depths['decoder']} decoder blocks: transformers "
                "sizes T5's generation cache by the encoder's depth, so the decoder may not be deeper; cut the "
                "decoder first")
        # Only a stack's first block holds the relative position bias table; the others read the bias it
        # computes. A stack that drops its first block hands the table to its new first block.
        first = self.blocks[0].layer[0].SelfAttention
        super().keep_blocks(indices)
        new_first = self.blocks[0].layer[0].SelfAttention
        if new_first is not first:
            new_first.relative_attention_bias = first.relative_attention_bias
            new_first.has_relative_attention_bias = True

    def attention(self, block: nn.Module) -> nn.Module:
        return block.layer[0].SelfAttention

    def cross_attention(self, block: nn.Module) -> nn.Module | None:
        return block.layer[1].EncDecAttention if len(block.layer) == 3 else None

    def encoder_readers(self, block: nn.Module) -> list[nn.Module]:
        cross = self.cross_attention(block)
        return [] if cross is None else [cross.k, cross.v]

    def qkv(self, block: nn.Module) -> QKV:
        a = block.layer[0].SelfAttention
        return QKV(q=a.q, k=a.k, v=a.v)

    def width_parts(self, block: nn.Module) -> WidthParts:
        a, mlp = block.layer[0].SelfAttention, block.layer[-1].DenseReluDense
        mlp_in = [mlp.wi_0, mlp.wi_1] if hasattr(mlp, "wi_0") else [mlp.wi]  # gated (v1.1, FLAN) or not
        cross = self.cross_attention(block)
        # The first block's bias table gives every block of the stack its per-head position bias, so a stack's
        # self-attention blocks keep one head set; cross-attention reads no table (each block its own heads).
        return WidthParts(q=a.q, k=a.k, v=a.v, o=a.o, mlp_in=mlp_in, mlp_out=mlp.wo,
                          norms=[layer.layer_norm for layer in block.layer],
                          cross=None if cross is None else (cross.q, cross.k, cross.v, cross.o),
                          head_table=a.relative_attention_bias if a.has_relative_attention_bias else None)

    def set_attention_heads(self, attention: nn.Module, num_heads: int) -> None:
        attention.n_heads, attention.inner_dim = num_heads, num_heads * attention.key_value_proj_dim

    @property
    def head_dim(self) -> int:
        return self.config.d_kv

    @property
    def max_positions(self) -> int | None:
        return None  # relative position buckets: no fixed limit

    def module_kind(self, name: str, module: nn.Module) -> str:
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("shared", "embed_tokens"):
            return "embeddings"
        if leaf == "relative_attention_bias":
            return "other"  # a (buckets, heads) position bias table, not a token table
        if name == "lm_head" or name.startswith("classification_head"):
            return "head"
        if ".SelfAttention." in name or ".EncDecAttention." in name:
            return "attention"
        if ".DenseReluDense." in name:
            return "mlp"
        if "norm" in leaf:
            return "norm"
        return "other"


ADAPTERS: tuple[type[ArchAdapter], ...] = (LlamaAdapter, GPT2Adapter, BertAdapter, BartAdapter, T5Adapter)


def supported_model_types() -> list[str]:
    return sorted(t for a in ADAPTERS for t in a.model_types)


def get_adapter(model: nn.Module, stack: str | None = None) -> ArchAdapter:
    """The adapter for `model`: by its `model_type` where known, else by its module layout (a decoder
    that follows the LLaMA layout gets the LLaMA adapter); otherwise an error naming what did not fit.
    `stack` picks the block stack it views (`encoder` / `decoder`; needed for encoder-decoder models' blocks)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for adapter_cls in ADAPTERS:
        if model_type in adapter_cls.model_types:
            return adapter_cls(model, stack)
    mismatch = LlamaAdapter.layout_mismatch(model)
    if mismatch is None:
        return LlamaAdapter(model, stack)
    raise UnsupportedArchitectureError(
        f"architecture {model_type!r} is not supported: it is not one of "
        f"{', '.join(t for t in supported_model_types() if t not in LlamaAdapter.model_types)}, and it does "
        f"not follow the LLaMA layout: {mismatch}"
    )


def linear_weight(module: nn.Module) -> torch.Tensor:
    """Weight as (out_features, in_features) for nn.Linear and GPT-2 Conv1D alike (a view, not a copy)."""
    return out_in(module, module.weight)


def weight_rows(module: nn.Module) -> torch.Tensor:
    """(out, in) rows of a linear's weight (nn.Linear, Conv1D) or of an embedding table (one per token)."""
    return module.weight if isinstance(module, nn.Embedding) else linear_weight(module)


def out_in(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """A tensor shaped like `module.weight` (e.g. its gradient) viewed as (out_features, in_features)."""
    return tensor.t() if weight_is_transposed(module) else tensor


def is_linear(module: nn.Module) -> bool:
    return _is_linear(module)
