"""--fsdp with two gloo processes on the CPU: the sampler gathers each sharded unit once for all its tokens
(and samples what the whole model samples) while the ranks stop at different lengths; the scripts that
tests/test_ddp.py does not compare with one process (there sft.py, dpo.py, grpo.py make the same update to
1e-5) train sharded and rank 0 saves a whole model that from_pretrained loads; --fsdp with --lora-rank is
refused in one line. Stopped and resumed: tests/test_ddp.py."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from conftest import ROOT, saved_weights
from test_ddp import pairs_file, run, train_rows  # noqa: F401 (pairs_file: a fixture)

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def torchrun(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*TORCHRUN, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_the_sampler_gathers_each_unit_once_and_samples_what_the_whole_model_does():
    # seed 0: rank 0's completions end after 3 tokens, rank 1's after 4 (a forward fewer on rank 0)
    result = torchrun("tests/fsdp_worker.py", "8", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(ranks) == 2 and {r["length"] for r in ranks} == {3, 4}, ranks
    for rank in ranks:
        assert rank["units"] == 5  # 4 decoder layers and the root
        assert rank["gathers"] == rank["units"], rank  # not once per unit per token
        assert rank["same"] and rank["freed"], rank


@pytest.mark.parametrize(
    "argv",
    [
        ["reward_model.py", "--batch-size", "4", "--num-epochs", "1"],
        "reinforce.py --judge correct --batch-size 2 --group-size 4 --total-steps 2 --eval-size 4".split(),
        "ppo_rlhf.py --judge correct --batch-size 8 --num-minibatches 2 --total-steps 2 --eval-size 4"
        .split(),
    ],
    ids=lambda argv: argv[0],
)
def test_every_other_script_trains_sharded_and_saves_a_whole_model(tmp_path, argv, pairs_file):  # noqa: F811
    if argv[0] == "reward_model.py":
        argv = [*argv, "--data", pairs_file]
    run_dir = run([*argv, "--log-every", "1", "--fsdp"], 2, tmp_path, "two")
    rows = train_rows(run_dir)
    assert rows and all(torch.isfinite(torch.tensor(r["train/loss"])) for r in rows)
    scalar = argv[0] == "reward_model.py"
    model_class = AutoModelForSequenceClassification if scalar else AutoModelForCausalLM
    model = model_class.from_pretrained(os.path.join(run_dir, "model"))
    saved = saved_weights(os.path.join(run_dir, "model"))
    assert all(torch.equal(model.state_dict()[k], saved[k]) for k in saved)  # every weight whole, not a shard
    painter = saved_weights(os.path.join(ROOT, "common", "painter"))
    assert any(not torch.equal(saved[k], painter[k]) for k in saved if k in painter)  # trained


def test_fsdp_with_lora_is_refused_in_one_line(tmp_path):
    result = torchrun("grpo.py", "--fsdp", "--lora-rank", "4", "--output-dir", str(tmp_path))
    # the launcher reports the failed ranks with its own traceback; each rank's error is one line
    assert result.returncode != 0 and "--fsdp and --lora-rank are not combined here" in result.stderr
    assert "[rank0]: Traceback" not in result.stderr, result.stderr[-2000:]
