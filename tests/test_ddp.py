"""torchrun with two CPU processes (gloo): the same parameter update as one process with the whole batch, with
DDP and with --fsdp (sft.py, dpo.py, grpo.py, through tests/ddp_worker.py: fixed samples, SGD), and every
script runs distributed and writes one metrics.jsonl and one model; a pair of processes stopped and resumed
(DDP, FSDP) ends as the unbroken pair."""

import glob
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, saved_weights

PAIRS = [
    ("#d48475", "Sunset Dust", "Grey"),
    ("#1f6357", "Deep Teal Forest", "Yellow Banana Cream Pie"),
    ("#f3c64a", "Ochre", "Midnight Blue Sky"),
    ("#738595", "Patina Haze", "Hot Pink"),
    ("#fffed8", "Pale Cream", "Black"),
    ("#96aeb0", "Windows Grey", "Red Brick Red"),
    ("#b3c3bd", "Foggy Grey Green", "Orange"),
    ("#3a2b4c", "Dark Plum", "Lemon Ice"),
    ("#c9e4f2", "Sky Blue", "Mud"),
]


def run(argv: list[str], processes: int, tmp_path, name: str) -> str:
    """`python argv` (processes = 1) or `torchrun --nproc_per_node 2 argv`; returns the one run folder."""
    out = str(tmp_path / name)
    launcher = (
        []
        if processes == 1
        else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, *launcher, *argv, "--output-dir", out],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = os.listdir(out)
    assert len(runs) == 1, runs  # only rank 0 writes
    run_dir = os.path.join(out, runs[0])
    assert len(glob.glob(os.path.join(run_dir, "metrics.jsonl"))) == 1
    saved = ("model.safetensors", "adapter_model.safetensors")  # a model, or LoRA's adapters
    assert any(os.path.exists(os.path.join(run_dir, "model", name)) for name in saved)
    return run_dir


def train_rows(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [row for row in map(json.loads, f) if "train/loss" in row]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text(
        "".join(
            json.dumps({"prompt": f"Name this paint color: {h}", "chosen": c, "rejected": r}) + "\n"
            for h, c, r in PAIRS
        )
    )
    return str(path)


ONE_PROCESS = {}  # argv -> its one-process run folder, which the DDP and the FSDP comparison share


def assert_same_update(argv: list[str], tmp_path, metric_names: tuple[str, ...], two_flags=()) -> None:
    """2 processes x half batch (two_flags: --fsdp) == 1 process x full batch: the saved weights (1e-5) and
    the logged metrics."""
    if tuple(argv) not in ONE_PROCESS:
        ONE_PROCESS[tuple(argv)] = run(argv, 1, tmp_path, "one")
    one, two = ONE_PROCESS[tuple(argv)], run([*argv, *two_flags], 2, tmp_path, "two")
    start = load_file(os.path.join(ROOT, "common", "painter", "model.safetensors"))
    w1 = load_file(os.path.join(one, "model", "model.safetensors"))
    w2 = load_file(os.path.join(two, "model", "model.safetensors"))
    moved = max(float((w1[k] - start[k]).abs().max()) for k in start)
    assert moved > 1e-3, moved  # the update is not trivially small
    diff = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    assert diff < 1e-5, diff
    rows1, rows2 = train_rows(one), train_rows(two)
    assert len(rows1) == len(rows2) > 0
    for r1, r2 in zip(rows1, rows2):
        for name in metric_names:
            assert r2[name] == pytest.approx(r1[name], rel=1e-4, abs=1e-6), (name, r1[name], r2[name])


@pytest.mark.parametrize("two_flags", [[], ["--fsdp"]], ids=["ddp", "fsdp"])  # FSDP2: the same update
def test_sft_two_processes_give_the_one_process_update(tmp_path, two_flags):
    assert_same_update(
        (
            "tests/ddp_worker.py sft --model common/painter --total-steps 2 --batch-size 8 "
            "--grad-accum-steps 2 --learning-rate 0.1 --warmup-steps 0 --log-every 1 "
            "--eval-every 1000 --eval-size 4"
        ).split(),
        tmp_path,
        ("train/loss", "train/grad_norm"),
        two_flags,
    )


@pytest.mark.parametrize("two_flags", [[], ["--fsdp"]], ids=["ddp", "fsdp"])  # FSDP2: the same update
def test_dpo_two_processes_give_the_one_process_update(tmp_path, pairs_file, two_flags):
    assert_same_update(
        [
            *"tests/ddp_worker.py dpo --data".split(),
            pairs_file,
            *(
                "--batch-size 4 --num-epochs 1 --learning-rate 0.1 --warmup-steps 0 --log-every 1 "
                "--eval-every 1000 --eval-size 4"
            ).split(),
        ],
        tmp_path,
        ("train/loss", "train/grad_norm", "rewards/margins", "logps/chosen"),
        two_flags,
    )


@pytest.mark.parametrize("two_flags", [[], ["--fsdp"]], ids=["ddp", "fsdp"])  # FSDP2: the same update
def test_grpo_two_processes_give_the_one_process_update(tmp_path, two_flags):
    # token-mean divides by the tokens of the WHOLE batch, which the two ranks share unequally
    assert_same_update(
        (
            "tests/ddp_worker.py grpo --judge correct --batch-size 4 --group-size 4 "
            "--loss-agg token-mean --micro-batch-size 4 --total-steps 2 --learning-rate 0.1 "
            "--log-every 1 --eval-every 1000 --eval-size 4"
        ).split(),
        tmp_path,
        (
            "train/loss",
            "train/grad_norm",
            "train/reward",
            "train/kl",
            "train/entropy",
            "train/completion_len",
        ),
        two_flags,
    )


@pytest.mark.parametrize(
    "argv",
    [
        # sft.py and dpo.py: the comparisons above (through tests/ddp_worker.py)
        ["reward_model.py", "--batch-size", "4", "--num-epochs", "1"],
        # and LoRA under DDP: the adapters' gradients averaged, rank 0 saves them
        ("grpo.py --judge correct --batch-size 2 --group-size 4 --total-steps 2 --eval-size 4 --lora-rank 4")
        .split(),
        ("reinforce.py --judge correct --batch-size 2 --group-size 4 --total-steps 2 --eval-size 4").split(),
        (
            "ppo_rlhf.py --judge correct --batch-size 8 --num-minibatches 2 --total-steps 2 --eval-size 4"
        ).split(),
    ],
    ids=lambda argv: argv[0],
)
def test_every_script_runs_under_torchrun(tmp_path, argv, pairs_file):
    if argv[0] == "reward_model.py":
        argv = [*argv, "--data", pairs_file]
    run_dir = run([*argv, "--log-every", "1"], 2, tmp_path, "two")
    assert len(train_rows(run_dir)) >= 1
    if "--lora-rank" in argv:
        assert os.path.exists(os.path.join(run_dir, "model", "adapter_model.safetensors"))


def test_dynamic_sampling_under_torchrun_keeps_as_many_whole_groups_on_each_rank(tmp_path):
    """Half the hexes score the same whatever the name: the ranks drop different numbers of groups, sample
    more, and still step together (a rank with fewer groups would hang DDP or fail the step)."""
    (tmp_path / "half.py").write_text(
        "def half(prompts, completions, **kwargs):\n"
        "    return [float(len(c)) if p[-1] in '01234567' else 0.5 for p, c in zip(prompts, completions)]\n"
    )
    argv = ["grpo.py", "--judge", f"{tmp_path / 'half.py'}:half", "--dynamic-sampling", "--batch-size", "4"]
    argv += "--group-size 4 --micro-batch-size 4 --total-steps 3 --eval-size 4 --log-every 1".split()
    rows = train_rows(run(argv, 2, tmp_path, "two"))
    assert len(rows) == 3 and all(r["train/frac_zero_std"] == 0 for r in rows)
    assert sum(r["train/dropped_groups"] for r in rows) > 0


def test_a_batch_that_does_not_split_is_refused(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            *(
                "-m torch.distributed.run --standalone --nproc_per_node=2 grpo.py --batch-size 3 --output-dir"
            ).split(),
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert (
        result.returncode != 0 and "--batch-size 3 must be divisible by the 2 processes" in result.stderr
    ), result.stderr[-2000:]


@pytest.mark.parametrize("flags", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_two_processes_stopped_and_resumed_end_as_the_unbroken_run(tmp_path, flags):
    """Each rank saves its own random states (FSDP: its shards of the weights and Adam state too); the
    resumed pair of processes continues both streams."""
    argv = (
        "--total-steps 4 --batch-size 4 --group-size 4 --micro-batch-size 4 --eval-every "
        "2 --save-every 1 --eval-size 4 --log-every 1 --judge correct"
    ).split() + flags
    unbroken = run(["grpo.py", *argv], 2, tmp_path, "unbroken")
    out = str(tmp_path / "broken")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    died = subprocess.run(
        [*launcher, "tests/resume_worker.py", "grpo", "2", *argv, "--output-dir", out],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert died.returncode != 0  # both ranks died after step 2's checkpoint
    (broken,) = glob.glob(os.path.join(out, "*"))
    resumed = subprocess.run(
        [*launcher, "grpo.py", "--resume", broken],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    weights = saved_weights(os.path.join(broken, "model"))
    expected = saved_weights(os.path.join(unbroken, "model"))
    assert all(torch.equal(weights[k], expected[k]) for k in expected)
    assert [r["train/loss"] for r in train_rows(broken)] == [r["train/loss"] for r in train_rows(unbroken)]
