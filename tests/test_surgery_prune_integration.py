"""Structured pruning on the real SmolLM2-135M and SOTU text (short calibration): importance-chosen blocks
beat the every-other rule at the same depth, width cuts keep a loadable model, and both reload exactly."""

import copy

import pytest
import torch
from helpers import integration

from lmcompress.data.corpus import load_corpus, token_stream
from lmcompress.data.specs import CorpusSpec
from lmcompress.formats import export_model, load_model
from lmcompress.models import get_adapter
from lmcompress.models.precision import bf16_pays
from lmcompress.surgery.calibration import calibration_batches
from lmcompress.surgery.depth import calibration_loss, choose_blocks
from lmcompress.surgery.truncate import truncate_layers
from lmcompress.surgery.width import prune_width, sizes_for_params

pytestmark = [pytest.mark.integration, integration]


@pytest.fixture(scope="module")
def smollm2_and_text():
    model, tokenizer = load_model("smollm2-135m")
    splits = load_corpus(CorpusSpec(name="sotu"))
    train = token_stream(splits["train"].select(range(4)), tokenizer)[: 8 * 128].view(8, 128)
    test = token_stream(splits["test"].select(range(2)), tokenizer)[: 8 * 128].view(8, 128)
    return model, tokenizer, calibration_batches(train, 8, batch_size=4), calibration_batches(test, 8, batch_size=4)


def test_measured_depth_pruning_beats_every_other_on_held_out_text(smollm2_and_text, tmp_path):
    model, tokenizer, calib, held_out = smollm2_and_text
    depth = get_adapter(model).num_layers
    choice = choose_blocks(model, calib, "angular", 6, bf16=bf16_pays(), progress=False)
    assert len(choice.removed) == 6 and choice.removed == list(range(choice.removed[0], choice.removed[0] + 6))
    assert choice.removed[-1] < depth - 1  # the last block, which writes the logits' input, stays
    pruned = truncate_layers(copy.deepcopy(model), choice.kept)
    naive = truncate_layers(copy.deepcopy(model), [i for i in range(depth) if i % 5 != 4])  # 6 evenly spaced
    measured_loss, naive_loss = calibration_loss(pruned, held_out), calibration_loss(naive, held_out)
    assert measured_loss < naive_loss, (measured_loss, naive_loss)
    folder = export_model(pruned, tokenizer, tmp_path / "depth", format="hf")[0]
    reloaded, _ = load_model(folder)
    assert reloaded.config.num_hidden_layers == depth - 6
    ids = held_out[0]["input_ids"][:1, :32]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, pruned(ids).logits, rtol=1e-4, atol=1e-4)


def test_width_pruning_to_a_parameter_count_reloads(smollm2_and_text, tmp_path):
    model, tokenizer, calib, held_out = smollm2_and_text
    model = copy.deepcopy(model)
    total = sum(p.numel() for p in model.parameters())
    sizes = sizes_for_params(model, int(total * 0.8), ["heads", "mlp", "hidden"])
    prune_width(model, calib, sizes, bf16=bf16_pays(), progress=False)
    params = sum(p.numel() for p in model.parameters())
    assert 0.75 * total < params <= 0.8 * total
    assert model.config.hidden_size % model.config.num_attention_heads == 0
    assert model.config.head_dim == 64
    loss = calibration_loss(model, held_out, bf16=bf16_pays())
    assert loss < 8.0  # cut, not destroyed (random text of a 49k vocabulary is ~10.8)
    folder = export_model(model, tokenizer, tmp_path / "width", format="hf")[0]
    reloaded, _ = load_model(folder)
    ids = held_out[0]["input_ids"][:1, :32]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
