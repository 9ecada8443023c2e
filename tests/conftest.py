import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


# each script on the painter in seconds: tiny batches, 4 eval prompts, the cheap `correct` judge
RL = dict(eval_size=4, judge="correct", max_new_tokens=6)
TINY = {
    "grpo": dict(RL, batch_size=2, group_size=4, micro_batch_size=8),
    "reinforce": dict(RL, batch_size=2, group_size=4, micro_batch_size=8),
    "ppo_rlhf": dict(RL, batch_size=4, num_minibatches=1, num_ppo_epochs=1),
    "sft": dict(
        model=os.path.join(ROOT, "common", "painter"),
        batch_size=8,
        warmup_steps=0,
        eval_size=4,
        max_new_tokens=6,
    ),
    "dpo": dict(RL, num_prompts=12, eval_pairs=4, batch_size=8, num_epochs=1, warmup_steps=0),
    "reward_model": dict(num_prompts=12, eval_prompts=4, batch_size=8, num_epochs=1, judge="correct"),
}


# one optimiser step of each script (dpo and reward_model: 12 prompts make one batch of pairs)
ONE_STEP = {name: dict(TINY[name], total_steps=1) for name in ("grpo", "reinforce", "ppo_rlhf", "sft")}
ONE_STEP.update(dpo=TINY["dpo"], reward_model=TINY["reward_model"])


def run_one_step(script, tmp_path, **overrides) -> str:
    """One optimiser step of `script` (a module) on the painter, logged; returns its run folder."""
    flags = {**ONE_STEP[script.__name__], **overrides}
    return script.main(script.Args(output_dir=str(tmp_path), seed=3, log_every=1, **flags))["run_dir"]


def saved_weights(folder: str) -> dict:
    """The tensors of a saved model folder (its safetensors file), by name."""
    from safetensors.torch import load_file

    (path,) = [os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".safetensors")]
    return load_file(path)


def write_jsonl(path, rows: list) -> str:
    """One JSON value per line; returns the path as a string, for a script's flags."""
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return str(path)


def read_jsonl(path) -> list:
    with open(path) as f:
        return [json.loads(line) for line in f]


def run_script(*argv: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python <argv>` from the repository root, as a user would type it."""
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, message: str) -> None:
    """Bad input stops the script with a message, not a traceback."""
    assert result.returncode != 0, result.stdout[-1000:]
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]


def assert_run_console(result: subprocess.CompletedProcess, output_dir, metric: str) -> None:
    """One run folder whose metrics.jsonl has `metric`; on the console, the changed flags first, short step
    and eval lines (samples aside), and last the run folder with the eval's headline before -> after."""
    assert result.returncode == 0, result.stderr[-2000:]
    (run,) = os.listdir(output_dir)
    with open(os.path.join(output_dir, run, "metrics.jsonl")) as f:
        assert any(metric in json.loads(line) for line in f), metric
    lines = result.stdout.strip().splitlines()
    assert lines[0].split()[0].endswith(".py") and lines[-1].startswith("done in") and run in lines[-1], (
        lines[-1]
    )
    assert "->" in lines[-1]  # eval/reward (or accuracy) before -> after
    short = [line for line in lines if line.startswith(("step ", "eval "))]
    assert short and all(len(line) <= 110 for line in short), max(short, key=len)


def assert_help_lists(script: str, flags: list[str]) -> None:
    help_text = run_script(script, "--help").stdout
    assert all(flag in help_text for flag in flags), [f for f in flags if f not in help_text]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: learning checks of several minutes, run with `pytest -m slow`")


def pytest_collection_modifyitems(config, items):
    """Slow learning checks are deselected (and counted as such) unless asked for with -m slow."""
    if "slow" not in (config.getoption("-m") or ""):
        slow = [item for item in items if "slow" in item.keywords]
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if "slow" not in item.keywords]


@pytest.fixture(scope="session")
def painter():
    from common.models import load_model_and_tokenizer

    return load_model_and_tokenizer()
