"""Recipe stages: `distill` (corpus and task data), `student` (smaller config, teacher init), task heads."""

import copy
import logging

import datasets
import pytest
import torch
from helpers import tiny_model

from lmcompress.core.errors import RecipeError
from lmcompress.distill.batches import mlm_collate
from lmcompress.distill.heads import copy_head, with_classification_head
from lmcompress.distill.layermaps import layer_map
from lmcompress.models import get_adapter
from lmcompress.recipe import Recipe
from lmcompress.recipe.base import Run
from lmcompress.recipe.runner import preflight

logging.getLogger("accelerate").setLevel(logging.ERROR)


class TinyTokenizer:
    pad_token_id, mask_token_id, all_special_ids = 0, 4, [0, 1, 2, 4]

    def __len__(self):
        return 128


class FakeRun(Run):
    """A Run whose corpus blocks and task are tiny in-memory data sets (no tokenizer, no files)."""

    def lm_blocks(self, split, block_size=None):
        gen = torch.Generator().manual_seed({"train": 0, "validation": 1, "test": 2}[split])
        ids = torch.randint(5, 128, (24, block_size or self.recipe.block_size), generator=gen)
        return datasets.Dataset.from_dict({"input_ids": ids.tolist()}).with_format("torch")


def recipe(stages, **extra):
    return Recipe.parse({"teacher": "tiny", "corpus": {"name": "sotu"}, "block_size": 16,
                                  "stages": stages, **extra})


def make_run(tmp_path, stages, family="llama", **kw):
    run = FakeRun(recipe=recipe(stages), out_dir=tmp_path)
    run.teacher = tiny_model(family, **kw)
    run.student = copy.deepcopy(run.teacher)
    run.tokenizer = TinyTokenizer()
    return run


DISTILL = {"stage": "distill", "steps": 3, "batch_size": 4, "log_with": "none",
           "losses": [{"type": "logits"}, {"type": "hidden", "layer_map": "uniform+last"},
                      {"type": "relations"}, {"type": "ce", "weight": 0.5}]}


def test_distill_stage_trains_the_student_and_reports(tmp_path):
    run = make_run(tmp_path, [{"stage": "student", "layers": 2}, DISTILL])
    before = copy.deepcopy(run.teacher)
    for stage in run.recipe.stages:
        stage.run(run)
    row = run.report.rows[-1]
    assert row["stage"] == "distill" and row["train_steps"] == 3 and row["train_tokens"] == 3 * 4 * 16
    assert {"loss", "loss_logits", "loss_hidden", "loss_relations", "loss_ce", "eval_loss"} <= set(row)
    assert row["train_tokens_per_s"] > 0
    for (name, p), q in zip(run.teacher.named_parameters(), before.parameters(), strict=True):
        assert torch.equal(p, q), f"teacher changed: {name}"
    assert not any(p.requires_grad for p in run.teacher.parameters())
    assert (tmp_path / "checkpoints/01-distill/step-00000003").is_dir()


def test_distill_stage_resumes_a_finished_stage_without_training(tmp_path):
    run = make_run(tmp_path, [DISTILL])
    run.recipe.stages[0].run(run)
    trained = copy.deepcopy(run.student.state_dict())
    again = make_run(tmp_path, [DISTILL])
    again.resume = True
    again.recipe.stages[0].run(again)
    assert all(torch.equal(trained[k], v) for k, v in again.student.state_dict().items())


KEPT_HIDDEN = {**DISTILL, "losses": [{"type": "hidden", "layer_map": "kept"}, {"type": "ce"}]}


def test_kept_layer_map_pairs_each_student_block_with_the_teacher_block_it_was_cut_from(tmp_path):
    run = make_run(tmp_path, [{"stage": "truncate", "keep": [0, 1, 3]}, {"stage": "truncate", "keep": [0, 2]},
                              KEPT_HIDDEN])
    run.student_blocks = [0, 1, 2, 3]  # as the load stage records a copy of the 4-block teacher
    preflight(run.recipe.stages, run)
    for stage in run.recipe.stages[:2]:
        stage.run(run)
    assert run.student_blocks == run.report.meta["kept_layers"] == [0, 3]  # the second cut composes
    distill = run.recipe.stages[2]
    hidden = distill._losses(run)[0]
    assert hidden.layer_map == [0, 3] and distill.losses[0].layer_map == "kept"  # the recipe is left as written
    assert hidden.build(run.teacher, run.student).pairs == [(0, 0), (1, 3)]
    distill.run(run)
    assert run.report.rows[-1]["loss_hidden"] > 0


def test_kept_layer_map_follows_the_student_stage_and_is_refused_where_no_block_came_from_the_teacher(tmp_path):
    mapped = make_run(tmp_path / "a", [{"stage": "student", "layers": 2}, KEPT_HIDDEN])
    mapped.student_blocks = [0, 1, 2, 3]
    mapped.recipe.stages[0].run(mapped)
    assert mapped.student_blocks == [0, 2]  # the uniform map the student stage copied the blocks by
    fresh = make_run(tmp_path / "b", [{"stage": "student", "layers": 2, "init": "random"}, KEPT_HIDDEN])
    fresh.student_blocks = [0, 1, 2, 3]
    with pytest.raises(RecipeError, match=r"distill.losses\[0\].layer_map: 'kept' .* came from is not known"):
        preflight(fresh.recipe.stages, fresh)
    fresh.recipe.stages[0].run(fresh)
    assert fresh.student_blocks is None
    with pytest.raises(RecipeError, match="layer_map 'kept' needs a student cut"):
        fresh.recipe.stages[1].run(fresh)
    with pytest.raises(RecipeError, match="outside a recipe give them as a list"):
        layer_map("kept", 4, 2)


def test_encoder_on_a_corpus_gets_masked_inputs(tmp_path):
    stage = {**DISTILL, "losses": [{"type": "ce"}, {"type": "attention"}]}
    run = make_run(tmp_path, [stage], family="bert")
    run.recipe.stages[0].run(run)
    assert run.report.rows[-1]["loss_ce"] > 0
    collate = mlm_collate(TinyTokenizer(), 0.5, 0)
    torch.manual_seed(0)
    batch = collate([{"input_ids": torch.arange(5, 69)}])
    chosen = batch["labels"] != -100
    assert 0 < chosen.sum() < 64 and (batch["labels"][chosen] == torch.arange(5, 69)[chosen[0]]).all()
    assert (batch["input_ids"][~chosen] == torch.arange(5, 69)[~chosen[0]]).all()
    assert (batch["input_ids"][chosen] == 4).float().mean() > 0.5  # mostly [MASK]


def test_loss_config_errors_name_the_field():
    with pytest.raises(RecipeError, match=r"stages\[0\]\.losses\[1\]\.temperature"):
        recipe([{**DISTILL, "losses": [{"type": "ce"}, {"type": "logits", "temperature": 0}]}])
    with pytest.raises(RecipeError, match=r"losses\[0\].type: unknown loss 'od'; allowed: attention, ce"):
        recipe([{**DISTILL, "losses": [{"type": "od"}]}])
    with pytest.raises(RecipeError, match=r"needs a top-level `task:` section"):
        recipe([{**DISTILL, "data": "task"}])


def test_student_stage_narrower_and_shallower_initialised_from_teacher(tmp_path, family):
    run = make_run(tmp_path, [{"stage": "student", "layers": 2, "hidden_size": 16, "intermediate_size": 24}],
                   family=family)
    run.recipe.stages[0].run(run)
    from lmcompress.models.adapters import get_adapter, linear_weight

    t, s = get_adapter(run.teacher), get_adapter(run.student)
    assert (s.num_layers, s.hidden_size, s.num_heads, s.head_dim) == (2, 16, 2, 8)
    mlp = [m for n, m in s.blocks[0].named_modules() if s.module_kind(f"{s.blocks_prefix}.0.{n}", m) == "mlp"
           and hasattr(m, "weight")]
    assert mlp and {tuple(linear_weight(m).shape) for m in mlp} <= {(24, 16), (16, 24)}
    # Student block 1 starts from teacher block 2 (uniform map): the leading heads and channels of each
    # of q, k and v (GPT-2's fused c_attn is sliced part by part).
    t_qkv, s_qkv = t.qkv(t.blocks[2]), s.qkv(s.blocks[1])
    if t_qkv.fused is not None:
        t_parts = linear_weight(t_qkv.fused).split(32)
        s_parts = linear_weight(s_qkv.fused).split(16)
    else:
        t_parts = [linear_weight(m) for m in (t_qkv.q, t_qkv.k, t_qkv.v)]
        s_parts = [linear_weight(m) for m in (s_qkv.q, s_qkv.k, s_qkv.v)]
    for t_w, s_w in zip(t_parts, s_parts, strict=True):
        assert torch.equal(s_w, t_w[: s_w.shape[0], :16])
    assert torch.equal(s.embeddings.weight, t.embeddings.weight[:, :16])
    assert run.student(input_ids=torch.randint(3, 128, (2, 8))).logits.shape == (2, 8, 128)


def test_student_stage_same_width_copies_the_mapped_blocks(tmp_path):
    run = make_run(tmp_path, [{"stage": "student", "layers": 2, "layer_map": [1, 3]}])
    run.recipe.stages[0].run(run)
    t, s = run.teacher.model, run.student.model
    for si, ti in ((0, 1), (1, 3)):
        for (name, a), b in zip(s.layers[si].state_dict().items(), t.layers[ti].state_dict().values(), strict=True):
            assert torch.equal(a, b), name
    ids = torch.randint(3, 128, (1, 6))
    assert run.student.generate(ids, max_new_tokens=2, do_sample=False).shape == (1, 8)


def test_resized_config_errors():
    with pytest.raises(RecipeError, match="not divisible"):
        get_adapter(tiny_model("llama")).resized_config(hidden_size=20, num_heads=3)
    with pytest.raises(RecipeError, match="no grouped-query attention"):
        get_adapter(tiny_model("gpt2")).resized_config(num_kv_heads=2)


def test_classification_head_keeps_the_transformer_and_copies_to_the_student():
    import transformers
    from helpers import tiny_config

    base = transformers.BertModel(tiny_config("bert")).eval()
    model = with_classification_head(base, 2, ["other", "great"])
    assert type(model).__name__ == "BertForSequenceClassification" and model.config.id2label[1] == "great"
    for name, tensor in base.state_dict().items():
        assert torch.equal(model.bert.state_dict()[name], tensor), name
    student = with_classification_head(copy.deepcopy(base), 2)
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    assert copy_head(model, student) == 4  # pooler.dense and classifier, weight and bias
    assert torch.equal(student.classifier.weight, model.classifier.weight)


def test_task_distillation_of_a_classifier(tmp_path):
    from types import SimpleNamespace

    run = make_run(tmp_path, [{**DISTILL, "losses": [{"type": "logits", "hard_weight": 0.5}]}], family="bert",
                   task="sequence-classification")
    run.recipe.stages[0].data = "task"
    gen = torch.Generator().manual_seed(0)
    rows = datasets.Dataset.from_dict({
        "input_ids": torch.randint(5, 128, (16, 10), generator=gen).tolist(),
        "attention_mask": [[1] * 10] * 8 + [[1] * 6 + [0] * 4] * 8, "labels": [0, 1] * 8}).with_format("torch")
    run.data._task = SimpleNamespace(tokenized=lambda tok, split, max_length=None, pad=True: rows)
    run.recipe.stages[0].run(run)
    assert run.report.rows[-1]["loss_logits"] > 0


def test_augmentation_alters_half_the_rows_of_a_training_batch_and_never_the_held_out_ones(tmp_path, monkeypatch):
    from lmcompress.distill.batches import AUGMENTED_ROWS, augmenting_collate
    from lmcompress.distill.trainer import pad_collate

    rows = [{"input_ids": torch.cat([torch.tensor([1]), torch.arange(5, 69), torch.tensor([2])]),
             "labels": torch.tensor(i % 2)} for i in range(400)]
    plain = pad_collate(rows, 0)
    torch.manual_seed(0)
    batch = augmenting_collate(TinyTokenizer(), 0.2, lambda r: pad_collate(r, 0))(rows)
    changed = batch["input_ids"] != plain["input_ids"]
    altered = changed.any(dim=1)
    assert torch.equal(batch["labels"], plain["labels"])  # the rows keep their labels
    assert abs(altered.float().mean() - AUGMENTED_ROWS) < 0.1
    assert not changed[:, [0, -1]].any()  # special tokens stay
    # within an altered row, ~20% of the tokens chosen, of which ~90% change (80% [MASK], 10% random)
    assert abs(changed[altered].float().mean() - 0.2 * 0.9) < 0.03
    assert (batch["input_ids"][changed] == 4).float().mean() > 0.8
    # without a mask token (a decoder's tokenizer) the chosen tokens become random ones
    no_mask = type("NoMask", (TinyTokenizer,), {"mask_token_id": None, "all_special_ids": [0, 1, 2]})()
    batch = augmenting_collate(no_mask, 0.2, lambda r: pad_collate(r, 0))(rows)
    assert (batch["input_ids"] != plain["input_ids"]).any() and not (batch["input_ids"] == 4).sum() > 100

    # in a stage: training batches altered, held-out ones (the eval loss) as they are; other data refused
    run = make_run(tmp_path, [{**DISTILL, "losses": [{"type": "logits"}]}], family="bert",
                   task="sequence-classification")
    stage = run.recipe.stages[0]
    stage.data, stage.augment = "task", 0.3
    run.data._task = toy_task()
    seen = []
    fit = type(stage).fit
    monkeypatch.setattr(type(stage), "fit", lambda self, run, objective, rows, eval_rows, collate, train_collate=None:
                        seen.append((collate, train_collate)) or fit(self, run, objective, rows, eval_rows, collate,
                                                                     train_collate))
    stage.run(run)
    collate, train_collate = seen[0]
    torch.manual_seed(1)
    picked = [run.data._task.tokenized(None, "train")[i] for i in range(64)]
    assert torch.equal(collate(picked)["input_ids"], torch.stack([r["input_ids"] for r in picked]))
    assert not torch.equal(train_collate(picked)["input_ids"], collate(picked)["input_ids"])
    assert run.report.rows[-1]["train_steps"] == 3
    with pytest.raises(RecipeError, match=r"distill\.augment: alters a task's rows \(data: task\); this "
                                          "stage reads corpus data"):
        corpus_run = make_run(tmp_path / "c", [{**DISTILL, "augment": 0.1}], family="bert",
                              task="sequence-classification")
        preflight(corpus_run.recipe.stages, corpus_run)


def toy_task(n=64, length=10):
    """Label 1 iff the first token is 5: learnable in a few dozen steps by a tiny encoder."""
    from types import SimpleNamespace

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(6, 128, (n, length), generator=gen)
    labels = torch.arange(n) % 2
    ids[labels == 1, 0] = 5
    rows = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * length] * n,
                                       "labels": labels.tolist()}).with_format("torch")
    return SimpleNamespace(name="toy", num_labels=2, label_names=["no", "yes"], metric="accuracy",
                           tokenized=lambda tokenizer, split, max_length=None, pad=True: rows)


def test_finetune_gives_a_bare_encoder_a_trained_head_and_the_student_a_copy(tmp_path):
    import transformers
    from helpers import tiny_config

    stage = {"stage": "finetune", "steps": 40, "batch_size": 16, "lr": 2e-3, "log_with": "none",
             "log_every": 5}
    run = FakeRun(recipe=Recipe.parse({"teacher": "tiny", "task": {"name": "toy"}, "stages": [stage]}),
                  out_dir=tmp_path)
    torch.manual_seed(0)
    run.teacher = transformers.BertModel(tiny_config("bert")).eval()
    run.student, run.tokenizer = copy.deepcopy(run.teacher), TinyTokenizer()
    run.data._task = toy_task()
    run.recipe.stages[0].run(run)
    assert type(run.teacher).__name__ == "BertForSequenceClassification"
    assert not run.teacher.training and not any(p.requires_grad for p in run.teacher.parameters())
    assert all(torch.equal(a, b) for a, b in zip(run.student.state_dict().values(),
                                                  run.teacher.state_dict().values(), strict=True))
    trained, scored = run.report.rows
    assert trained["train_steps"] == 40 and scored["model"] == "teacher (fine-tuned)"
    assert scored["accuracy"] >= 0.9
