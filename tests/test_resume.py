"""--resume: a run stopped after k steps and resumed ends exactly as the unbroken run; a save killed with
SIGKILL leaves a checkpoint that loads; a resumed run refuses another script's folder or other settings."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import dpo
import grpo
import ppo_rlhf
import reinforce
import reward_model
import sft
from common.run import Run
from conftest import ROOT, TINY, assert_one_line_error, run_script, saved_weights

STEPS = dict(total_steps=4, eval_every=2, log_every=1)  # four steps, evaluated every two
PAIRS = dict(num_prompts=40, num_epochs=2, eval_every=2, log_every=1)  # four batches of pairs over two epochs
SHORT = {  # a few steps of each script on the painter, each with the state that a resume must restore
    grpo: dict(TINY["grpo"], **STEPS, micro_batch_size=4),  # micro-batches
    reinforce: dict(TINY["reinforce"], **STEPS, baseline="moving-average"),  # a running mean
    ppo_rlhf: dict(
        TINY["ppo_rlhf"], **STEPS, num_minibatches=2, num_ppo_epochs=2, target_kl=0.5, kl_horizon=100
    ),
    sft: dict(TINY["sft"], **STEPS, learning_rate=1e-4, warmup_steps=2),  # the schedule
    dpo: dict(TINY["dpo"], **PAIRS, eval_pairs=8, warmup_steps=1),  # the order of the pairs in an epoch
    reward_model: dict(TINY["reward_model"], **PAIRS, eval_prompts=8),
}


class Crash(Exception):
    pass


def rows_after(run_dir: str, step: int) -> list[dict]:
    """metrics.jsonl rows after `step`, timings left out (they are wall clock)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [{k: v for k, v in row.items() if not k.startswith("perf/")} for row in rows if row["step"] > step]


@pytest.mark.parametrize("script", SHORT, ids=lambda m: m.__name__)
def test_a_run_stopped_and_resumed_ends_as_the_unbroken_run(script, tmp_path, monkeypatch):
    settings = dict(SHORT[script], save_every=1)
    unbroken = script.main(script.Args(output_dir=str(tmp_path / "unbroken"), **settings))["run_dir"]
    stop_after = 2
    save = Run.save_checkpoint

    def save_then_crash(run, step, state):  # the process dies right after step 2's checkpoint
        save(run, step, state)
        if step == stop_after:
            raise Crash

    monkeypatch.setattr(Run, "save_checkpoint", save_then_crash)
    with pytest.raises(Crash):
        script.main(script.Args(output_dir=str(tmp_path / "broken"), **settings))
    monkeypatch.undo()
    (broken,) = glob.glob(str(tmp_path / "broken" / "*"))
    assert rows_after(broken, stop_after) == []
    resumed = script.main(script.Args(resume=broken))["run_dir"]  # --resume alone: the run's own settings
    assert resumed == broken
    assert rows_after(resumed, stop_after) == rows_after(unbroken, stop_after) != []
    weights, expected = (
        saved_weights(os.path.join(resumed, "model")),
        saved_weights(os.path.join(unbroken, "model")),
    )
    assert weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in weights)
    if script is ppo_rlhf:  # the value model is saved and resumed too (its weights live in the checkpoint)
        value = load_file(os.path.join(resumed, "checkpoints", "step-4", "value_model.safetensors"))
        expected_value = load_file(os.path.join(unbroken, "checkpoints", "step-4", "value_model.safetensors"))
        assert all(torch.equal(value[k], expected_value[k]) for k in value)


def test_resume_refuses_other_settings_and_other_scripts(tmp_path):
    run = grpo.main(grpo.Args(output_dir=str(tmp_path), **SHORT[grpo]))["run_dir"]
    assert_one_line_error(run_script("grpo.py", "--resume", run, "--beta", "0.1"), "--beta 0.04, not 0.1")
    assert_one_line_error(run_script("reinforce.py", "--resume", run), "is not a reinforce.py run")
    assert_one_line_error(run_script("grpo.py", "--resume", str(tmp_path / "nope")), "has no args.json")
    assert_one_line_error(
        run_script("grpo.py", "--resume", run, "--total-steps", "5"), "--total-steps 4, not 5"
    )
    finished = run_script("grpo.py", "--resume", run, "--log-every", "2")  # how often it logs may change
    assert finished.returncode == 0 and "resumed from step 4" in finished.stdout, finished.stderr[-2000:]


SAVER = """
import sys, time, types, torch
sys.path.insert(0, {root!r})
import numpy as np
from common.models import load_model_and_tokenizer
from common.run import Run

model, _ = load_model_and_tokenizer()
run = types.SimpleNamespace(  # the part of a Run a save reads
    dir={run!r}, script="sft", reference="painter", active=True, rank=0, world=1, t_start=0.0, eval_s=0.0,
    rng=np.random.default_rng(0), models={{"model": model}}, optimizer=torch.optim.AdamW(model.parameters()),
)
print("ready", flush=True)
for step in range(1, 10_000):
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(step)  # every weight holds the step, so a mix of two saves would show
    Run.save_checkpoint(run, step, {{"marker": step}})
"""


def test_a_save_killed_midway_leaves_a_checkpoint_that_loads(tmp_path):
    from common.models import load_model_and_tokenizer
    from safetensors.torch import load_model

    run = str(tmp_path / "sft__kill__1__0")
    script = tmp_path / "saver.py"
    script.write_text(SAVER.format(root=ROOT, run=run))
    for delay in (0.4, 0.9, 1.3, 1.7, 2.2):
        proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)  # a few saves in: somewhere in the middle of one
        assert proc.poll() is None, "the saver died by itself"  # still saving when it is killed
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        with open(os.path.join(run, "checkpoints", "latest")) as f:
            folder = os.path.join(run, "checkpoints", f.read().strip())
        state = json.load(open(os.path.join(folder, "state.json")))
        model, _ = load_model_and_tokenizer()
        load_model(model, os.path.join(folder, "model.safetensors"))
        step = state["step"]
        assert state["state"]["marker"] == step
        assert all(bool((p == step).all()) for p in model.parameters())  # the weights of that very save
        torch.load(os.path.join(folder, "optimizer.pt"), weights_only=True)
        torch.load(os.path.join(folder, "rng-rank0.pt"), weights_only=True)
