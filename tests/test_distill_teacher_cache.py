"""The offline teacher cache: the cached KL against the live teacher's top-k KL on the same batch, the
full-vocabulary limit, shards and lookups, fingerprints, and refusals of caches made from something else."""

import dataclasses
import json
import os

import pytest
import torch
import torch.nn.functional as F
from helpers import run_on_random_blocks, tiny_model

from lmcompress.core.errors import LmcompressError, RecipeError
from lmcompress.distill.teacher_cache import (
    CacheKey,
    TeacherCache,
    build_teacher_cache,
    data_fingerprint,
    teacher_fingerprint,
    teacher_topk,
    topk_kl,
)


def _blocks(n=10, length=12, seed=0):
    return torch.randint(3, 128, (n, length), generator=torch.Generator().manual_seed(seed))


def _key(teacher, blocks, k=8, temperature=2.0):
    return CacheKey(teacher=teacher_fingerprint(teacher), tokenizer="tok", data=data_fingerprint(blocks),
                    block_size=blocks.shape[1], k=k, temperature=temperature)


def test_cached_kl_equals_the_live_top_k_kl_on_the_same_batch(tmp_path):
    teacher, student = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    blocks = _blocks()
    cache = build_teacher_cache(teacher, blocks, tmp_path / "c", _key(teacher, blocks), batch_size=3,
                                shard_blocks=4, progress=False)
    batch = [7, 2, 5]  # across shards 0 and 1
    ids = blocks[batch]
    mask = torch.ones(ids.shape)
    mask[0, 9:] = 0
    with torch.no_grad():
        s_logits, t_logits = student(ids).logits, teacher(ids).logits
    live = topk_kl(s_logits, *teacher_topk(t_logits, 8, 2.0), 2.0, mask)
    rows = cache.lookup(batch)
    assert rows["teacher_ids"].shape == (3, 12, 8) and rows["teacher_tail"].shape == (3, 12)
    cached = topk_kl(s_logits, rows["teacher_ids"], rows["teacher_logprobs"], rows["teacher_tail"], 2.0, mask)
    torch.testing.assert_close(cached, live, rtol=2e-3, atol=1e-4)  # float16 log-probabilities


def test_top_k_kl_over_the_whole_vocabulary_is_the_full_kl():
    t_logits, s_logits = torch.randn(2, 5, 128), torch.randn(2, 5, 128)
    full = F.kl_div(F.log_softmax(s_logits / 2, -1), F.log_softmax(t_logits / 2, -1), log_target=True,
                    reduction="none").sum(-1).mean() * 4
    torch.testing.assert_close(topk_kl(s_logits, *teacher_topk(t_logits, 128, 2.0), 2.0), full, rtol=1e-4, atol=1e-5)
    ids, logprobs, tail = teacher_topk(t_logits, 16, 1.0)
    mass = logprobs.exp().sum(-1) + tail.exp()
    torch.testing.assert_close(mass, torch.ones_like(mass))  # the tail bucket holds the rest, exactly
    assert topk_kl(t_logits, ids, logprobs, tail, 1.0) < 1e-5  # a student equal to its teacher


def test_cache_size_and_a_rebuild_keeps_finished_shards(tmp_path):
    teacher = tiny_model("llama")
    blocks = _blocks()
    key = _key(teacher, blocks)
    cache = build_teacher_cache(teacher, blocks, tmp_path / "c", key, shard_blocks=4, progress=False)
    # uint16 ids + float16 log-probs per kept token, a float32 tail per position, npy headers
    assert 8 * 2 + 8 * 2 + 4 <= cache.bytes_per_token < 8 * 2 + 8 * 2 + 4 + 12
    last_block = cache.lookup([9])["teacher_logprobs"]  # read before the shard holding it goes
    first = tmp_path / "c" / "shard-00000.ids.npy"
    os.utime(first, (1, 1))
    # a build killed before its last shard: the plan's marker is there, the manifest and shard 2 are not
    manifest = json.loads((tmp_path / "c" / "teacher_cache.json").read_text())
    plan = {k: manifest[k] for k in ("key", "shard_blocks", "blocks")}
    (tmp_path / "c" / "teacher_cache.building.json").write_text(json.dumps(plan))
    (tmp_path / "c" / "shard-00002.ids.npy").unlink()
    (tmp_path / "c" / "teacher_cache.json").unlink()
    with pytest.raises(LmcompressError, match="no teacher_cache.json .* build it again to complete it"):
        TeacherCache(tmp_path / "c")
    again = build_teacher_cache(teacher, blocks, tmp_path / "c", key, shard_blocks=4, progress=False)
    assert first.stat().st_mtime == 1  # kept
    torch.testing.assert_close(again.lookup([9])["teacher_logprobs"], last_block)  # rebuilt the same
    assert (tmp_path / "c" / "teacher_cache.building.json").exists() is False
    build_teacher_cache(teacher, blocks, tmp_path / "c", key, shard_blocks=4, progress=False)  # finished: no-op
    assert first.stat().st_mtime == 1
    other = dataclasses.replace(key, k=4)
    with pytest.raises(LmcompressError, match="holds a finished cache of other data or settings"):
        build_teacher_cache(teacher, blocks, tmp_path / "c", other, shard_blocks=4, progress=False)
    (tmp_path / "c" / "teacher_cache.json").unlink()  # unfinished, of another plan: starts over
    (tmp_path / "c" / "teacher_cache.building.json").write_text(json.dumps(plan))
    rebuilt = build_teacher_cache(teacher, blocks, tmp_path / "c", other, shard_blocks=4, progress=False)
    assert rebuilt.lookup([0])["teacher_ids"].shape == (1, 12, 4)
    with pytest.raises(LmcompressError, match="block 10 is outside its 10 blocks"):
        rebuilt.lookup([10])


def test_a_cache_from_other_data_teacher_or_settings_is_refused_by_field(tmp_path):
    teacher = tiny_model("llama")
    blocks = _blocks()
    key = _key(teacher, blocks)
    cache = build_teacher_cache(teacher, blocks, tmp_path / "c", key, progress=False)
    cache.check(key)
    other_data = dataclasses.replace(key, data=data_fingerprint(_blocks(seed=1)))
    with pytest.raises(RecipeError, match=r"does not match this run: data is '[0-9a-f]+' in the cache"):
        cache.check(other_data)
    other_teacher = tiny_model("llama", seed=3)
    assert teacher_fingerprint(other_teacher) != key.teacher
    with pytest.raises(RecipeError, match="teacher is .*; temperature is 2.0 in the cache, 1.0 here"):
        cache.check(dataclasses.replace(key, teacher=teacher_fingerprint(other_teacher), temperature=1.0))


def test_a_folder_with_other_files_is_refused_and_left_alone(tmp_path):
    teacher = tiny_model("llama")
    blocks = _blocks()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "shard-0.npy").write_text("keep me")  # looks like a shard, is not one of ours
    with pytest.raises(LmcompressError, match=r"holds other files \(shard-0.npy\); choose an empty or new folder"):
        build_teacher_cache(teacher, blocks, tmp_path / "mine", _key(teacher, blocks), progress=False)
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["shard-0.npy"]
    with pytest.raises(LmcompressError, match=r"blocks must be \(N, 12\)"):
        build_teacher_cache(teacher, blocks[:, :6], tmp_path / "c", _key(teacher, blocks), progress=False)


# --- in the objective and the distill stage -----------------------------------------------------------


def test_the_objective_with_cached_rows_runs_no_teacher_and_matches_the_live_one(tmp_path):
    from lmcompress.distill.losses import build_objective, parse_loss

    teacher, student = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    blocks = _blocks()
    key = _key(teacher, blocks, k=128, temperature=2.0)  # the whole vocabulary: the full KL
    cache = build_teacher_cache(teacher, blocks, tmp_path / "c", key, progress=False)
    losses = [parse_loss({"type": "logits", "temperature": 2.0}), parse_loss({"type": "ce", "weight": 0.5})]
    live = build_objective(teacher, student, losses)
    cached = build_objective(teacher, student, losses, cached_teacher=True)  # given a teacher, still runs none
    batch = {"input_ids": blocks[:3]}
    calls = []
    teacher.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        want = live(batch)
        calls.clear()
        got = cached({**batch, **cache.lookup([0, 1, 2])})
    assert not calls
    torch.testing.assert_close(got["logits"], want["logits"], rtol=2e-3, atol=1e-4)
    torch.testing.assert_close(got["ce"], want["ce"])
    hidden = [parse_loss({"type": "hidden", "layer_map": "uniform"})]
    with pytest.raises(RecipeError, match="hidden needs the live teacher"):
        build_objective(teacher, student, hidden, cached_teacher=True)


def _stage_recipe(tmp_path, cache: str):
    from lmcompress.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("teacher: tiny\nblock_size: 12\ncorpus: {name: sotu}\nstages:\n"
                    "  - {stage: distill, steps: 2, batch_size: 2, log_with: none, eval_batches: 0,\n"
                    f"     losses: [{{type: logits, temperature: 2.0}}], teacher_cache: {cache}}}\n")
    return load_recipe(path)


def _stage_run(tmp_path, recipe):
    return run_on_random_blocks(tmp_path / "run", recipe, tiny_model("llama", seed=1), 10, 12,
                                teacher=tiny_model("llama", seed=0))


def test_distill_stage_builds_the_cache_once_then_reuses_it_and_refuses_another(tmp_path):
    folder = tmp_path / "cache"
    recipe = _stage_recipe(tmp_path, f"{{path: {folder}, k: 8}}")
    run = _stage_run(tmp_path, recipe)
    recipe.stages[0].run(run)
    cache_row, train_row = run.report.rows
    assert cache_row["blocks"] == 4 and cache_row["k"] == 8 and cache_row["built"] is True  # 2 steps x 2 read
    assert train_row["train_steps"] == 2 and train_row["loss"] > 0
    again = _stage_run(tmp_path, recipe)
    recipe.stages[0].run(again)
    assert again.report.rows[0]["built"] is False  # read, not built
    other = _stage_recipe(tmp_path, f"{{path: {folder}, k: 4}}")
    with pytest.raises(RecipeError, match="does not match this run: k is 8 in the cache, 4 here"):
        other.stages[0].run(_stage_run(tmp_path, other))
    none = _stage_recipe(tmp_path, f"{{path: {tmp_path / 'empty'}, build: false}}")
    with pytest.raises(RecipeError, match="holds no teacher cache and build is false"):
        none.stages[0].run(_stage_run(tmp_path, none))


def test_the_stage_feeds_each_step_the_cached_rows_of_its_own_blocks(tmp_path):
    # k = the whole vocabulary: the cached KL is the full KL, so one step's loss must equal the live teacher's
    recipe = _stage_recipe(tmp_path, f"{{path: {tmp_path / 'full'}, k: 128}}")
    cached = _stage_run(tmp_path, recipe)
    recipe.stages[0].run(cached)
    live_recipe = _stage_recipe(tmp_path, "null")
    live = _stage_run(tmp_path, live_recipe)
    live_recipe.stages[0].run(live)
    cached_loss, live_loss = cached.report.rows[-1]["loss"], live.report.rows[-1]["loss"]
    assert cached_loss == pytest.approx(live_loss, rel=2e-3)


def test_encoder_students_and_missing_teachers_are_refused(tmp_path):
    recipe = _stage_recipe(tmp_path, f"{{path: {tmp_path / 'c'}}}")
    run = _stage_run(tmp_path, recipe)
    run.teacher = None
    with pytest.raises(RecipeError, match=r"teacher_cache: the cache is made from the teacher; put a `load` stage"):
        recipe.stages[0].run(run)
    run = _stage_run(tmp_path, recipe)
    run.teacher, run.student = tiny_model("bert", seed=0), tiny_model("bert", seed=1)
    with pytest.raises(RecipeError, match="an encoder's masked-LM batches differ every step"):
        recipe.stages[0].run(run)


def test_rows_read_are_the_rows_the_trainer_visits():
    from lmcompress.distill.trainer import BatchOrder, rows_read

    read = rows_read(50, batch_size=3, grad_accum=2, steps=4, world_size=2, seed=7)
    visited = {i for rank in range(2) for p in range(8) for i in BatchOrder(50, 3, 2, rank, 7).indices(p)}
    assert read == sorted(visited) and len(read) == 48  # 4 steps x 2 micro-batches x 3 rows x 2 processes
    assert rows_read(10, 2, 1, 12, 1, 0) == list(range(10))  # past one epoch: every row
