"""Loading is strict: a checkpoint whose tensors do not fit its config, or hold NaN, is one line naming
the tensors; a tampered config never runs code; a damaged file names itself."""

import json

import pytest
import safetensors.torch as st
import torch
from helpers import tiny_model, tiny_tokenizer

from lmcompress.core.errors import LmcompressError
from lmcompress.models import load_model


@pytest.fixture
def saved(tmp_path):
    folder = tmp_path / "m"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def edit_weights(folder, change):
    tensors = st.load_file(folder / "model.safetensors")
    change(tensors)
    st.save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_missing_and_unexpected_tensors_are_named(saved):
    edit_weights(saved, lambda t: (t.pop("model.layers.1.mlp.up_proj.weight"), t.update(extra=torch.zeros(2))))
    with pytest.raises(LmcompressError, match=r"do not fit the model's config: missing model.layers.1.mlp.up_proj.weight; unexpected extra"):
        load_model(saved)


def test_a_config_claiming_more_layers_than_the_weights_hold(saved):
    config = json.loads((saved / "config.json").read_text())
    config["num_hidden_layers"] = 6
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(LmcompressError, match=r"missing model.layers.4.* and \d+ more"):
        load_model(saved)


def test_nan_weights_are_refused(saved):
    edit_weights(saved, lambda t: t["model.layers.0.self_attn.q_proj.weight"].__setitem__((0, 0), float("nan")))
    with pytest.raises(LmcompressError, match=r"NaN or infinite values: model.layers.0.self_attn.q_proj.weight"):
        load_model(saved)


def test_a_truncated_safetensors_file_names_the_model(saved):
    data = (saved / "model.safetensors").read_bytes()
    (saved / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(LmcompressError, match=r"could not load model .*m' as causal-lm") as info:
        load_model(saved)
    assert "\n" not in str(info.value)


def test_a_tampered_config_runs_no_code(saved, tmp_path):
    marker = tmp_path / "ran"
    (saved / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\nfrom transformers import LlamaForCausalLM as Evil\n")
    config = json.loads((saved / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.Evil", "AutoModelForCausalLM": "evil.Evil"}
    (saved / "config.json").write_text(json.dumps(config))
    model, _ = load_model(saved)  # trust_remote_code is off: the built-in class, never the folder's code
    assert type(model).__name__ == "LlamaForCausalLM" and not marker.exists()


def test_a_fresh_task_head_only_where_a_task_was_asked_for(tmp_path, caplog):
    folder = tmp_path / "bert"
    tiny_model("bert").bert.save_pretrained(folder)  # a bare encoder: no classifier weights
    tiny_tokenizer().save_pretrained(folder)
    model, _ = load_model(folder, task="sequence-classification", num_labels=2)
    assert model.classifier.weight.shape == (2, 32) and "initialised a new task head" in caplog.text
    edit_weights(folder, lambda t: t.pop("encoder.layer.0.attention.self.query.weight"))
    with pytest.raises(LmcompressError, match="missing bert.encoder.layer.0.attention.self.query.weight|missing encoder"):
        load_model(folder, task="sequence-classification", num_labels=2)  # the head may be new, the rest not


def test_a_damaged_gguf_file_names_itself(tmp_path):
    from lmcompress.models.loading import check_gguf_file

    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(LmcompressError, match=r"junk.gguf: not a readable GGUF file"):
        check_gguf_file(tmp_path / "junk.gguf")


@pytest.mark.integration
def test_a_truncated_real_gguf_is_refused_before_loading(tmp_path):
    from lmcompress.core.assets import home
    from lmcompress.models.builtin import SMOLLM2_GGUF
    from lmcompress.models.loading import check_gguf_file

    source = home() / "downloads" / "smollm2-gguf" / SMOLLM2_GGUF
    if not source.exists():
        pytest.skip("SmolLM2 GGUF not fetched")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(source.read_bytes()[: 50_000_000])
    with pytest.raises(LmcompressError, match=r"cut.gguf: (not a readable GGUF file|tensor .* past the end)"):
        check_gguf_file(cut)
    check_gguf_file(source)  # the intact file passes
