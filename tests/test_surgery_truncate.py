import pytest
import torch
from helpers import tiny_model

from lmcompress.core.errors import RecipeError
from lmcompress.formats import export_model
from lmcompress.models import get_adapter, load_model
from lmcompress.surgery.truncate import resolve_layers, truncate_layers


def test_resolve_rules():
    assert resolve_layers("every-other", 6) == [0, 2, 4]
    assert resolve_layers("first-k", 6, k=2) == [0, 1]
    assert resolve_layers("last-k", 6, k=2) == [4, 5]
    assert resolve_layers([0, 3, -1], 6) == [0, 3, 5]


@pytest.mark.parametrize(
    ("keep", "k", "message"),
    [
        ([0, 6], None, r"layer\(s\) \[6\] out of range for a 6-layer model \(0..5\)"),
        ([], None, "empty"),
        ([1, 1], None, "repeats"),
        ([3, 1], None, "increasing"),
        ("first-k", None, "needs k in 1..6"),
        ("last-k", 7, "needs k in 1..6"),
    ],
)
def test_resolve_rejects_bad_lists(keep, k, message):
    with pytest.raises(RecipeError, match=message):
        resolve_layers(keep, 6, k=k, field="stages[1].keep")


def test_truncation_keeps_exactly_the_asked_layers(family):
    model = tiny_model(family, layers=6)
    original = get_adapter(model).blocks
    expected = [original[i] for i in (0, 2, 5)]
    truncate_layers(model, [0, 2, 5])
    a = get_adapter(model)
    assert a.num_layers == 3 and model.config.num_hidden_layers == 3
    assert all(x is y for x, y in zip(a.blocks, expected, strict=True))
    out = model(torch.randint(3, 128, (2, 9)))
    assert out.logits.shape[:2] == (2, 9) and torch.isfinite(out.logits).all()


def test_truncated_model_save_reload_identical_logits(family, tmp_path):
    model = tiny_model(family, layers=6)
    truncate_layers(model, [1, 4])
    ids = torch.randint(3, 128, (2, 11))
    with torch.no_grad():
        before = model(ids).logits
    export_model(model, None, tmp_path / "m", format="hf")
    task = "masked-lm" if family == "bert" else "causal-lm"
    reloaded, _ = _load_without_tokenizer(tmp_path / "m", task)
    with torch.no_grad():
        after = reloaded(ids).logits
    assert reloaded.config.num_hidden_layers == 2
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_truncated_decoder_generates_with_cache():
    model = tiny_model("llama", layers=6)
    truncate_layers(model, [0, 5])
    ids = torch.randint(3, 128, (1, 5))
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        uncached = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, use_cache=False)
    assert torch.equal(cached, uncached)


def _load_without_tokenizer(path, task):
    from lmcompress.models.loading import auto_class

    model = auto_class(task).from_pretrained(path, use_safetensors=True, attn_implementation="eager")
    return model.eval(), None


def test_load_model_rejects_missing_folder(tmp_path):
    from lmcompress.core.errors import LmcompressError

    with pytest.raises(LmcompressError, match="not a model folder: it has no config.json"):
        load_model(tmp_path)
    with pytest.raises(LmcompressError, match="model folder not found"):
        load_model(tmp_path / "nope")
