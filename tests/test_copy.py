"""A script copied into another project, as the README's "To copy a file" says: the script and the plumbing
it imports (common/__init__.py, models.py, task.py, run.py; at most 930 lines, none of the paint task) in an
empty folder, run there on a small local model (a chat template, pad = EOS) with the user's own reward
function from a file, SFT rows and preference pairs. The paint task is not there, so none of it can load."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, write_jsonl
from local_models import chatml_tokenizer, save_random_model

PLUMBING = ["__init__.py", "models.py", "task.py", "run.py"]
WORDS = ["Sunset Dust", "Navy Blue", "Burnt Sienna", "Ochre", "Slate Grey", "Rose Mist", "Deep Sea", "Lemon"]
REWARD = '''
def short_yes(prompts, completions, **kwargs):
    """The user's reward: 1 for a completion that says Yes, less 0.1 per word."""
    return [float("Yes" in c) - 0.1 * len(c.split()) for c in completions]
'''


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """The copy: six scripts (each needs only the same four plumbing files), the plumbing, a model, data."""
    folder = tmp_path_factory.mktemp("project")
    os.makedirs(folder / "common")
    for script in ["sft.py", "reward_model.py", "dpo.py", "grpo.py", "reinforce.py", "ppo_rlhf.py"]:
        shutil.copy(os.path.join(ROOT, script), folder)
    for name in PLUMBING:
        shutil.copy(os.path.join(ROOT, "common", name), folder / "common")
    tokenizer = chatml_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token  # pad = EOS, as many checkpoints ship
    save_random_model(str(folder / "model"), tokenizer, arch="qwen2")
    prompts = [f"Is {a} a good name for the {b} ?" for a in WORDS for b in WORDS[:3]]
    write_jsonl(folder / "prompts.jsonl", [{"prompt": p} for p in prompts])
    write_jsonl(folder / "sft.jsonl", [{"prompt": p, "completion": "Yes"} for p in prompts])
    pairs = [{"prompt": p, "chosen": "Yes", "rejected": "No Lemon Ochre"} for p in prompts]
    write_jsonl(folder / "pairs.jsonl", pairs)
    (folder / "my_rewards.py").write_text(REWARD)
    return folder


def run_copy(project, *argv: str) -> subprocess.CompletedProcess:
    """`python <argv>` in the copy's folder, whose `common` is the copy's (the repository is not on the
    path)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, *argv], cwd=project, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip


def test_the_plumbing_a_copy_takes_is_small_and_holds_no_paint_task():
    lines = sum(len(open(os.path.join(ROOT, "common", name)).readlines()) for name in PLUMBING)
    assert lines <= 930, lines
    for name in PLUMBING:
        source = open(os.path.join(ROOT, "common", name)).read()
        imported = [line for line in source.splitlines() if line.startswith(("from .", "import "))]
        assert not any(m in line for line in imported for m in ("colours", "judges", "recipe", "tasks")), name


COMMON = ["--model", "model", "--judge", "my_rewards.py:short_yes", "--eval-size", "4",
          "--max-new-tokens", "4"]  # fmt: skip
RUNS = {
    "sft": ["sft.py", *COMMON, "--data", "sft.jsonl", "--total-steps", "2", "--batch-size", "4",
            "--warmup-steps", "0", "--eval-every", "2", "--learning-rate", "1e-3"],
    "reward_model": ["reward_model.py", "--model", "model", "--data", "pairs.jsonl", "--batch-size", "4",
                     "--num-epochs", "1"],
    "dpo": ["dpo.py", *COMMON, "--data", "pairs.jsonl", "--batch-size", "4", "--num-epochs", "1"],
    "grpo": ["grpo.py", *COMMON, "--prompts", "prompts.jsonl", "--batch-size", "2", "--group-size", "4",
             "--total-steps", "2"],
    "reinforce": ["reinforce.py", *COMMON, "--prompts", "prompts.jsonl", "--batch-size", "2",
                  "--group-size", "4", "--total-steps", "2"],
    "ppo_rlhf": ["ppo_rlhf.py", *COMMON, "--prompts", "prompts.jsonl", "--batch-size", "4",
                 "--num-minibatches", "2", "--total-steps", "2"],
}  # fmt: skip


@pytest.mark.parametrize("name", RUNS)
def test_each_script_runs_in_the_copy_on_the_users_model_data_and_reward(project, name):
    out = f"runs_{name}"
    result = run_copy(project, *RUNS[name], "--output-dir", out, "--log-every", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = os.listdir(project / out)
    with open(project / out / run / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert any("train/loss" in row for row in rows), rows
    headline = "eval/accuracy" if name == "reward_model" else "eval/reward"
    evals = [row for row in rows if headline in row]
    assert len(evals) >= 2 and all(not k.startswith("eval/correct") for row in evals for k in row)
    assert os.path.exists(project / out / run / "model" / "model.safetensors")


def test_lora_in_a_copy_that_takes_common_lora_too(project):
    shutil.copy(os.path.join(ROOT, "common", "lora.py"), project / "common")
    result = run_copy(project, *RUNS["grpo"], "--lora-rank", "4", "--output-dir", "runs_lora")
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = os.listdir(project / "runs_lora")
    assert os.path.exists(project / "runs_lora" / run / "model" / "adapter_model.safetensors")


def test_ppo_in_the_copy_takes_the_copys_reward_model(project):
    trained = run_copy(project, *RUNS["reward_model"], "--output-dir", "runs_rm_for_ppo")
    assert trained.returncode == 0, trained.stderr[-3000:]
    (run,) = os.listdir(project / "runs_rm_for_ppo")
    result = run_copy(project, *RUNS["ppo_rlhf"], "--reward-model", f"runs_rm_for_ppo/{run}/model",
                      "--output-dir", "runs_ppo_rm")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["grpo.py", "--prompts", "prompts.jsonl", "--judge", "my_rewards.py:short_yes"], "model path"),
        (["grpo.py", "--model", "model", "--judge", "poet"], "paint-colour task"),
        (["grpo.py", "--model", "model", "--judge", "my_rewards.py:short_yes"], "paint-colour task"),
        (["sft.py", "--data", "sft.jsonl", "--judge", "my_rewards.py:short_yes"], "sft.py without --model"),
    ],
)
def test_what_belongs_to_the_paint_task_is_a_one_line_error_in_the_copy(project, argv, message):
    """No --model (the shipped painter, or a new one for sft), a built-in judge, no --prompts (the built-in
    hexes)."""
    result = run_copy(project, *argv, "--output-dir", "runs_errors")
    assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
