"""Running a model block by block on cached inputs computes what the model computes."""

import torch
from helpers import tiny_model

from lmcompress.models.adapters import get_adapter
from lmcompress.models.blocks import capture_block_inputs, fused_attention


def _batches(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0  # one padded row: masks must reach every block as the model builds them
    return [{"input_ids": ids, "attention_mask": mask, "labels": ids}, {"input_ids": ids[:, :7]}]


def test_blocks_run_on_cached_inputs_reproduce_every_hidden_state(family):
    model = tiny_model(family)
    batches = _batches()
    inputs = capture_block_inputs(model, batches)
    assert inputs.num_batches == 2 and inputs.tokens == 9 + 12 + 14
    hidden = inputs.hidden
    with torch.no_grad():
        for b, batch in enumerate(batches):
            batch = {k: v for k, v in batch.items() if k != "labels"}
            kw = {"use_cache": False} if get_adapter(model).causal else {}
            expected = get_adapter(model).base(**batch, output_hidden_states=True, **kw).hidden_states
            state = hidden[b]
            torch.testing.assert_close(state, expected[0])
            for i in range(len(inputs.blocks)):
                state = inputs.run(i, b, state)
                if i < len(inputs.blocks) - 1:  # the last entry of hidden_states is after the final norm
                    torch.testing.assert_close(state, expected[i + 1], rtol=1e-5, atol=1e-5)


def test_capture_leaves_the_model_as_it_was():
    model = tiny_model("llama").train()
    capture_block_inputs(model, _batches())
    assert model.training
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert all("forward" not in b.__dict__ for b in get_adapter(model).blocks)


def test_only_the_first_block_computes_during_the_capture(family):
    model = tiny_model(family)
    blocks = get_adapter(model).blocks
    calls = [0] * len(blocks)
    for i, block in enumerate(blocks):
        for m in block.modules():
            if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D":
                m.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    capture_block_inputs(model, _batches())
    assert calls[0] > 0 and not any(calls[1:])


def test_fused_attention_is_switched_on_for_the_block_and_back_after():
    model = tiny_model("llama")
    assert model.config._attn_implementation == "eager"
    with fused_attention(model):
        assert model.config._attn_implementation == "sdpa"
    assert model.config._attn_implementation == "eager"
