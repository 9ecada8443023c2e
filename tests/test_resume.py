"""--resume: a run stopped after k steps and resumed ends exactly as the unbroken run (LoRA adapters too),
and so does one killed with SIGKILL at any moment (mid-step, mid-eval, mid-save) and resumed again and again;
a save killed with SIGKILL leaves a checkpoint that loads; a judge's score of a name does not depend on the
run's history; a CUDA run's optimizer state loads on the CPU; a resumed run refuses another script's folder or
settings."""

import glob
import json
import os
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import dpo
import grpo
import ppo_rlhf
import reinforce
import reward_model
import sft
from common.resume import load_checkpoint
from common.run import Run
from conftest import ROOT, TINY, assert_one_line_error, read_jsonl, run_script, saved_weights

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


RESUMED = [(script, {}) for script in SHORT] + [(grpo, dict(lora_rank=4)), (ppo_rlhf, dict(lora_rank=4))]


@pytest.mark.parametrize("script,lora", RESUMED, ids=[s.__name__ + "-lora" * bool(x) for s, x in RESUMED])
def test_a_run_stopped_and_resumed_ends_as_the_unbroken_run(script, lora, tmp_path, monkeypatch):
    settings = dict(SHORT[script], save_every=1, **lora)  # LoRA: the adapters saved and resumed
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


# SIGKILL at a moment (tests/resume_worker.py); then checkpoints/, the step it names, the last logged
KILLS = [
    ("generate:3", ["latest", "step-3"], 3, 6),  # mid-eval of step 6 (the evals of steps 0, 3, 6)
    ("save_atomic:1", ["latest", "step-3"], 3, 6),  # step 6's eval logged, its model not saved
    ("save_model:1", ["latest", "step-3", "step-6.tmp"], 3, 6),  # step 6's checkpoint half written
    ("latest:1", ["latest", "latest.tmp", "step-3", "step-6"], 3, 6),  # step-6 renamed, latest not yet
    ("prune:1", ["latest", "step-3", "step-6"], 6, 6),  # latest names step-6; step-3 half removed
    ("sample:2", ["latest", "step-3", "step-6"], 6, 7),  # mid-step 8 (this process resumed at step 7)
]


def test_a_run_killed_at_any_moment_and_resumed_ends_as_the_unbroken_run(tmp_path):
    """One run killed from outside six times, each time resumed: it goes on from a whole checkpoint, drops
    the rows logged after it, and ends bit for bit as the unbroken run: its metrics (perf/* aside), samples
    and weights. With a judge that embeds names (poet), whose scores must not depend on the run's history: the
    last process, resumed at step 7, has embedded none of the names that the unbroken run had by then."""
    settings = dict(TINY["grpo"], judge="poet+correct", eval_size=8, total_steps=9, eval_every=3, log_every=1)
    settings.update(batch_size=4, group_size=8, micro_batch_size=32)  # 32 names a step: some come again
    unbroken = grpo.main(grpo.Args(output_dir=str(tmp_path / "unbroken"), **settings))["run_dir"]
    argv = [word for key, value in settings.items() for word in (f"--{key.replace('_', '-')}", str(value))]
    argv += ["--output-dir", str(tmp_path / "killed")]
    for moment, folders, checkpoint, last_logged in KILLS:
        killed = run_script("tests/resume_worker.py", "grpo", moment, *argv)
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        (run_dir,) = glob.glob(str(tmp_path / "killed" / "*"))
        assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == folders, moment
        with open(os.path.join(run_dir, "checkpoints", "latest")) as f:
            assert f.read() == f"step-{checkpoint}", moment
        assert read_jsonl(os.path.join(run_dir, "metrics.jsonl"))[-1]["step"] == last_logged, moment
        argv = ["--resume", run_dir]
    finished = run_script("grpo.py", *argv)
    assert finished.returncode == 0 and "resumed from step 6" in finished.stdout, finished.stderr[-2000:]
    assert rows_after(run_dir, -1) == rows_after(unbroken, -1)
    samples, expected_samples = (read_jsonl(os.path.join(d, "samples.jsonl")) for d in (run_dir, unbroken))
    assert samples == expected_samples
    weights, expected = (saved_weights(os.path.join(d, "model")) for d in (run_dir, unbroken))
    assert weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in weights)


def test_a_names_embedding_does_not_depend_on_what_was_embedded_with_it_or_before(monkeypatch):
    """A style judge's score of a name is the same alone, in a batch with names of other lengths, and after
    other names were memoised: else it would depend on the run's history, which no checkpoint holds."""
    from common import judges

    monkeypatch.setattr(judges, "_embeddings", judges.OrderedDict())
    names = ["sunset dust", "a long name for a pale and misty morning blue", "ochre"]
    alone = []
    for name in names:
        judges._embeddings.clear()
        alone.append(judges.embed([name])[0])
    judges._embeddings.clear()
    others = [f"{colour} number {i}" for i, colour in enumerate(["grey", "teal", "plum"] * 15)]
    together = judges.embed(others[:20] + names + others[20:])[20:23]  # 48 names: more than a batch holds
    judges._embeddings.clear()
    judges.embed(["burnt sienna", "cinnamon toast"])
    after_others = judges.embed(["burnt sienna", *names])[1:]
    for i, name in enumerate(names):
        assert torch.equal(together[i], alone[i]) and torch.equal(after_others[i], alone[i]), name


def test_a_checkpoint_saved_on_a_gpu_resumes_on_the_cpu(tmp_path, monkeypatch):
    """optimizer.pt loads onto the parameters' device, not onto the device its tensors were saved from (every
    rank on cuda:0; a CUDA run could not be resumed on a CPU, although --device may change on resume)."""
    from common.models import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer()
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    run = types.SimpleNamespace(  # the part of a Run that a save and a load read
        dir=str(tmp_path), script="grpo", base="painter", active=True, rank=0, world=1, t_start=0.0,
        eval_s=0.0, rng=np.random.default_rng(0), models={"model": model}, optimizer=optimizer,
        args=grpo.Args(),
    )  # fmt: skip
    Run.save_checkpoint(run, 1, {})
    # rewritten as a run on a GPU that this machine lacks writes it: every tensor tagged with that device
    path = os.path.join(tmp_path, "checkpoints", "step-1", "optimizer.pt")
    saved = torch.load(path, weights_only=True)
    absent_gpu = f"cuda:{torch.cuda.device_count()}"
    with monkeypatch.context() as patched:
        patched.setattr(torch.serialization, "location_tag", lambda storage: absent_gpu)
        torch.save(saved, path)
    resumed = torch.optim.AdamW(model.parameters(), fused=True)
    assert load_checkpoint(run, {"model": model}, resumed) == (2, {})
    for p in model.parameters():
        for key, value in resumed.state[p].items():
            assert value.device == p.device and torch.equal(value, optimizer.state[p][key]), key


def test_resume_refuses_other_settings_and_other_scripts(tmp_path):
    run = grpo.main(grpo.Args(output_dir=str(tmp_path), **SHORT[grpo]))["run_dir"]
    assert_one_line_error(run_script("grpo.py", "--resume", run, "--beta", "0.2"), "--beta 0.1, not 0.2")
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
    dir={run!r}, script="sft", base="painter", active=True, rank=0, world=1, t_start=0.0, eval_s=0.0,
    rng=np.random.default_rng(0), models={{"model": model}}, optimizer=torch.optim.AdamW(model.parameters()),
    args=Run.Args(),
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
