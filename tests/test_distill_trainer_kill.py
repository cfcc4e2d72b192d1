"""Kill a real `lmcompress run` at random points (SIGKILL, after its first checkpoint) and rerun it with
`--resume` until it finishes: the exported student is bitwise the one of an uninterrupted run."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import tiny_model, tiny_tokenizer, write_word_corpus
from safetensors.torch import load_file

KILLS = 3
RECIPE = """
name: kill
teacher: {teacher}
corpus: {{name: {corpus}, test_fraction: 0.1}}
block_size: 16
stages:
  - stage: truncate
    keep: [0, 2]
  - stage: distill
    steps: 60
    batch_size: 4
    lr: 1.0e-3
    warmup_steps: 5
    schedule: cosine
    checkpoint_every: 1
    eval_batches: 0
    losses: [{{type: logits}}, {{type: ce}}]
  - stage: export
"""


def lmcompress(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # 2 shared cores: threads only fight each other
    return subprocess.Popen([sys.executable, "-m", "lmcompress.cli", *map(str, args)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def newest_step(out: Path) -> int:
    return max((int(p.name.removeprefix("step-")) for p in out.glob("checkpoints/*/step-*")), default=0)


def finish(proc) -> None:
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]


@pytest.mark.slow
def test_killed_and_resumed_cli_run_exports_the_same_weights(tmp_path):
    teacher = tmp_path / "teacher"
    tiny_model("llama", attention_dropout=0.1).save_pretrained(teacher)  # dropout: the RNG must resume too
    tiny_tokenizer().save_pretrained(teacher)
    corpus = write_word_corpus(tmp_path / "corpus.jsonl")
    recipe = tmp_path / "kill.yaml"
    recipe.write_text(RECIPE.format(teacher=teacher, corpus=corpus))

    finish(lmcompress("run", recipe, "--out", tmp_path / "whole"))

    seed = time.time_ns()
    rng, out, kills = random.Random(seed), tmp_path / "killed", []
    proc = lmcompress("run", recipe, "--out", out)
    while len(kills) < KILLS:
        start = newest_step(out)
        while newest_step(out) <= start and proc.poll() is None:  # a new checkpoint: it made progress
            time.sleep(0.02)
        if proc.poll() is not None:
            break
        time.sleep(rng.uniform(0, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills.append(newest_step(out))
        proc = lmcompress("run", recipe, "--out", out, "--resume")
    finish(proc)

    assert kills, "the run finished before it could be killed"
    expected, got = (load_file(tmp_path / where / "model/model.safetensors") for where in ("whole", "killed"))
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), f"{name} differs (kills after steps {kills}, seed {seed})"
    assert not list(out.glob("checkpoints/*/.tmp-*"))
