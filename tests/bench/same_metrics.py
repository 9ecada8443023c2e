"""A refactor keeps every metric: short CPU fp32 runs of all six scripts, their metrics (perf/* aside), eval
samples and final weights written to one JSON, and two such JSONs compared.

    python tests/bench/same_metrics.py record before.json     # on the old code (or: record x.json grpo sft)
    python tests/bench/same_metrics.py record after.json      # on the new code
    python tests/bench/same_metrics.py compare before.json after.json

The runs cover each script's main paths: micro-batches, several iterations, beta 0 (no reference), every
baseline, the shared prompt columns of a large batch, --data files, a reward model in PPO, SFT from scratch.
About 6 minutes on 2 CPU cores.
"""

import hashlib
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAINTER = os.path.join(ROOT, "common", "painter")
RL = ["--eval-size", "4", "--judge", "correct", "--max-new-tokens", "6", "--total-steps", "3"]
RL += ["--eval-every", "2", "--log-every", "1"]
GROUPS = ["--batch-size", "2", "--group-size", "4", "--micro-batch-size", "8"]
PAIRS = ["--num-prompts", "12", "--batch-size", "8", "--num-epochs", "1", "--log-every", "1"]

# name: (script, flags); "{data}" is a folder of JSONL files written below, "{rm}" the reward_model run's model
RUNS = {
    "grpo": ("grpo.py", RL + GROUPS),
    "grpo_mu2": ("grpo.py", RL + GROUPS + ["--num-iterations", "2", "--micro-batch-size", "4",
                                            "--judge", "poet+correct", "--scale-rewards", "batch",
                                            "--loss-agg", "token-mean", "--mask-truncated"]),
    "grpo_beta0": ("grpo.py", RL + GROUPS + ["--beta", "0", "--loss-agg", "constant"]),
    "grpo_prompts": ("grpo.py", RL + GROUPS + ["--prompts", "{data}/prompts.jsonl", "--judge", "answer"]),
    "reinforce": ("reinforce.py", RL + GROUPS),
    "reinforce_ma": ("reinforce.py", RL + GROUPS + ["--baseline", "moving-average", "--beta", "0"]),
    "reinforce_gm": ("reinforce.py", RL + GROUPS + ["--baseline", "group-mean", "--micro-batch-size", "2"]),
    "sft": ("sft.py", ["--model", PAINTER, "--batch-size", "8", "--warmup-steps", "0", "--eval-size", "4",
                       "--max-new-tokens", "6", "--total-steps", "3", "--eval-every", "2", "--log-every", "1",
                       "--grad-accum-steps", "2"]),
    "sft_data": ("sft.py", ["--model", PAINTER, "--data", "{data}/sft.jsonl", "--batch-size", "4",
                            "--total-steps", "3", "--eval-every", "2", "--log-every", "1", "--eval-size", "4"]),
    "sft_scratch": ("sft.py", ["--total-steps", "2", "--batch-size", "8", "--eval-size", "4",
                               "--eval-every", "2", "--log-every", "1"]),
    "dpo": ("dpo.py", PAIRS + ["--eval-pairs", "4", "--eval-size", "4", "--eval-every", "1"]),
    "dpo_wide": ("dpo.py", ["--num-prompts", "120", "--batch-size", "48", "--num-epochs", "1", "--log-every", "1",
                            "--eval-pairs", "64", "--eval-size", "4", "--loss-type", "ipo",
                            "--precompute-ref-logps", "--judge", "correct"]),
    "dpo_data": ("dpo.py", ["--data", "{data}/pairs.jsonl", "--batch-size", "4", "--num-epochs", "1",
                            "--log-every", "1", "--eval-size", "4", "--judge", "correct", "--rpo-alpha", "0.5"]),
    "reward_model": ("reward_model.py", PAIRS + ["--eval-prompts", "4", "--judge", "correct"]),
    "reward_model_wide": ("reward_model.py", ["--num-prompts", "160", "--batch-size", "64", "--num-epochs", "1",
                                              "--log-every", "1", "--eval-prompts", "70", "--judge", "correct"]),
    "ppo_rlhf": ("ppo_rlhf.py", RL + ["--batch-size", "4", "--num-minibatches", "2", "--num-ppo-epochs", "2"]),
    "ppo_rlhf_rm": ("ppo_rlhf.py", RL + ["--batch-size", "4", "--num-minibatches", "1", "--num-ppo-epochs", "1",
                                        "--reward-model", "{rm}", "--target-kl", "0.5", "--truncated", "mask"]),
}


def write_data(folder: str) -> None:
    hexes = ["#d48475", "#1f3a5f", "#a0c4a8", "#ffcc00", "#502020", "#e0e0f0", "#336633", "#c0c0c0"]
    rows = {
        "prompts.jsonl": [{"prompt": f"Name this paint color: {h}", "answer": "Red"} for h in hexes],
        "sft.jsonl": [{"prompt": f"Name this paint color: {h}", "completion": n}
                      for h, n in zip(hexes * 2, ["Dusty Rose", "Navy", "Sage", "Gold"] * 4)],
        "pairs.jsonl": [{"prompt": f"Name this paint color: {h}", "chosen": "Dusty Rose", "rejected": "Navy Blue"}
                        for h in hexes * 2],
    }
    for name, content in rows.items():
        with open(os.path.join(folder, name), "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in content)


def record(path: str, only: list[str]) -> None:
    results, work = {}, tempfile.mkdtemp()
    write_data(work)
    for name, (script, flags) in RUNS.items():
        if only and name not in only and not (name == "reward_model" and "ppo_rlhf_rm" in only):
            continue
        out = os.path.join(work, name)
        rm = os.path.join(work, "reward_model", *os.listdir(os.path.join(work, "reward_model")), "model") if (
            "{rm}" in flags) else ""
        argv = [f.replace("{data}", work).replace("{rm}", rm) for f in flags]
        done = subprocess.run([sys.executable, script, *argv, "--output-dir", out], cwd=ROOT,
                              capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
        if done.returncode:
            sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
        (run,) = os.listdir(out)
        folder = os.path.join(out, run)
        with open(os.path.join(folder, "metrics.jsonl")) as f:
            metrics = [{k: v for k, v in json.loads(line).items() if not k.startswith("perf/")} for line in f]
        samples = []
        if os.path.exists(os.path.join(folder, "samples.jsonl")):
            with open(os.path.join(folder, "samples.jsonl")) as f:
                samples = [json.loads(line) for line in f]
        with open(os.path.join(folder, "model", "model.safetensors"), "rb") as f:
            weights = hashlib.sha256(f.read()).hexdigest()
        results[name] = {"metrics": metrics, "samples": samples, "weights": weights}
        print(f"{name}: {len(metrics)} rows, last {metrics[-1]}", flush=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=1)


def compare(before_path: str, after_path: str) -> None:
    before, after = json.load(open(before_path)), json.load(open(after_path))
    differ = [name for name in after if before[name] != after[name]]
    for name in differ:
        for part in ("metrics", "samples", "weights"):
            if before[name][part] != after.get(name, {}).get(part):
                print(f"{name}: {part} differ")
    print(f"{len(after)} runs identical" if not differ else f"{len(differ)} of {len(after)} runs differ")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    if sys.argv[1] == "record":
        record(sys.argv[2], sys.argv[3:])
    else:
        compare(sys.argv[2], sys.argv[3])
