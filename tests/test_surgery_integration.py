"""The offline methods on the real built-in models: SmolLM2-135M and MiniLM-L6 (short runs)."""

import pytest
import torch
from helpers import integration

from lmcompress.formats import export_model, load_model, size_report
from lmcompress.formats.common import safetensors_payload_bytes
from lmcompress.surgery.autoencoder import AutoencoderConfig
from lmcompress.surgery.calibration import calibration_batches
from lmcompress.surgery.factorize import factorize_

pytestmark = [pytest.mark.integration, integration]


def export_factorized(model, tokenizer, folder):
    return export_model(model, tokenizer, folder, format="factorized")[0]


def factorized_bytes(model):
    return size_report(model)["bytes"]


def _reload_matches(model, tokenizer, folder, inputs):
    loaded, loaded_tokenizer = load_model(folder)
    assert loaded_tokenizer is not None and loaded_tokenizer(["hello world"])["input_ids"] == tokenizer(["hello world"])["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, atol=1e-4, rtol=1e-4)
    weights = folder / "model.safetensors"
    assert safetensors_payload_bytes(weights) == factorized_bytes(model)
    assert abs(weights.stat().st_size - factorized_bytes(model)) / factorized_bytes(model) < 0.01
    assert size_report(loaded)["bytes"] == pytest.approx(factorized_bytes(model), rel=1e-6)


def test_smollm2_query_key_at_2x_svd_and_shared_autoencoder(tmp_path):
    model, tokenizer = load_model("smollm2-135m")
    dense = factorized_bytes(model)
    svd = factorize_(model, "svd", patterns=["*.q_proj"], ratio=2, progress=False)
    ae = factorize_(model, "autoencoder", patterns=["*.k_proj"], ratio=2, progress=False,
                    autoencoder=AutoencoderConfig(shared=True, steps=10, eval_every=5))
    assert 2 <= svd.plan.achieved < 2.01 and 2 <= ae.plan.achieved < 2.01
    saved = (svd.plan.original - svd.plan.stored + ae.plan.original - ae.plan.stored) * 4
    assert factorized_bytes(model) == dense - saved
    inputs = tokenizer(["Mr. Speaker, the state of our union is strong."], return_tensors="pt")
    _reload_matches(model, tokenizer, export_factorized(model, tokenizer, tmp_path / "smollm2"), inputs)


def test_minilm_classifier_fwsvd_with_task_calibration(tmp_path):
    from lmcompress.data.specs import TaskSpec
    from lmcompress.data.tasks import load_task

    task = load_task(TaskSpec(name="fine-foods", train_limit=32, test_limit=8, max_length=64))
    model, tokenizer = load_model("minilm-l6", task="sequence-classification", num_labels=task.num_labels)
    batches = calibration_batches(task.tokenized(tokenizer, "train"), 16, batch_size=8,
                                  pad_token_id=tokenizer.pad_token_id)
    result = factorize_(model, "fwsvd", patterns=["attention"], ratio=4, calibration=batches, progress=False)
    assert result.calibration_seconds > 0 and 4 <= result.plan.achieved < 4.05
    inputs = tokenizer(["Great coffee, would buy again", "stale"], padding=True, return_tensors="pt")
    _reload_matches(model, tokenizer, export_factorized(model, tokenizer, tmp_path / "minilm"), inputs)
