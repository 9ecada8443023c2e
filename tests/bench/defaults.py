"""The README's per-method numbers: each script's default run (and the few variants the README quotes), from the
shipped painter, two runs at a time with one thread each (OMP_NUM_THREADS=1), then one summary and the checks.

    python tests/bench/defaults.py                 # runs what is missing under --output-dir, then summarises
    python tests/bench/defaults.py --jobs 1        # one run at a time

Writes tests/bench/results/defaults.json: per run, the command, its wall time, and the first and last values of
the metrics the README quotes (eval/reward, eval/correct, eval/distinct, eval/top_name_share, eval/kl,
eval/accuracy; train/kl, train/reward, and DPO's logps/chosen and rewards/margins as first, last and mean), and
the checks, each PASS or FAIL (exit code 1 when one fails):
- the headline, `python grpo.py --group-size 8` (seeds 1-3): at least 0.9 distinct names at the last eval,
  eval/reward up by at least 0.15, eval/correct not below the start's, and no collapse line on the console;
- every other default run that has a judge (dpo, reinforce, ppo_rlhf, sft): eval/reward up by at least 0.05,
  eval/correct at most 0.02 below the start's;
- the README's reward-hacking command prints the collapse line.
A run is reused when its folder holds a finished run of the same command.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from curves import RESULTS, ROOT, eval_rows, find_run, read_rows  # noqa: E402
from compare_trl import child_env  # noqa: E402

BASIC = "/tmp/bench-runs/basic_colours"  # python -m common.tasks basic-colours writes it first
HACK = ["grpo.py", "--judge", "unhinged", "--scale-rewards", "group", "--beta", "0", "--learning-rate", "5e-4"]
RUNS = {  # the longest first (sft: 8000 steps), then the defaults' checks, then the README's variants
    "sft": ["sft.py"],
    "dpo": ["dpo.py"],
    "ppo": ["ppo_rlhf.py"],
    **{f"grpo_seed{s}": ["grpo.py", "--group-size", "8", "--seed", str(s)] for s in (1, 2, 3)},
    **{f"rloo_seed{s}": ["reinforce.py", "--seed", str(s)] for s in (1, 2, 3)},
    "hack": HACK,
    "grpo_paper": ["grpo.py", "--scale-rewards", "group", "--beta", "0.04", "--learning-rate", "2e-4"],
    "reward_model": ["reward_model.py"],
    "dpo_poet": ["dpo.py", "--judge", "poet"],
    "dpo_paper": ["dpo.py", "--rpo-alpha", "0"],
    **{f"ppo_beta{b}": ["ppo_rlhf.py", "--kl-coef", b, "--total-steps", "150"] for b in ("0", "0.05", "0.2", "1.0")},
    **{f"rlvr_seed{s}": ["grpo.py", "--prompts", f"{BASIC}/train.jsonl", "--eval-prompts", f"{BASIC}/eval.jsonl",
                         "--judge", "answer", "--total-steps", "200", "--seed", str(s)] for s in (1, 2, 3)},
}
RM_PPO = ["ppo_rlhf.py", "--judge", "poet"]  # + --reward-model <the reward_model run's model>


def summary(run_dir: str) -> dict:
    rows, evals = read_rows(run_dir), eval_rows(run_dir)
    out = {"run_dir": run_dir, "steps": evals[-1]["step"], "train_s": evals[-1]["perf/train_s"]}
    with open(os.path.join(os.path.dirname(run_dir), "stdout.log")) as f:
        out["collapse_lines"] = [line.strip() for line in f if line.startswith("collapse:")]
    for key in ("eval/reward", "eval/correct", "eval/distinct", "eval/top_name_share", "eval/kl", "eval/accuracy"):
        values = [r[key] for r in evals if key in r]
        if values:
            out[key] = [values[0], values[-1]]
    for key in ("train/kl", "train/reward", "logps/chosen", "rewards/margins"):
        values = [r[key] for r in rows if key in r]
        if values:
            out[key] = {"first": values[0], "last": values[-1], "mean": sum(values) / len(values)}
    return out


def run(name: str, argv: list[str], out_root: str, python: str, threads: int = 1) -> dict:
    out_dir = os.path.join(out_root, name)
    command = [python, *argv, "--output-dir", out_dir]
    done = find_run(out_dir)
    if done and os.path.exists(os.path.join(out_dir, "command.json")):
        with open(os.path.join(out_dir, "command.json")) as f:
            saved = json.load(f)
        if saved["argv"] == argv and eval_rows(done):
            return {**summary(done), "command": " ".join(argv), "wall_s": saved["wall_s"]}
    subprocess.run(["rm", "-rf", out_dir])
    os.makedirs(out_dir)
    print(f"$ OMP_NUM_THREADS={threads} python " + " ".join(argv), flush=True)
    t0 = time.perf_counter()
    with open(os.path.join(out_dir, "stdout.log"), "w") as log:
        subprocess.run(command, cwd=ROOT, env=child_env(threads), stdout=log, stderr=subprocess.STDOUT, check=True)
    wall_s = time.perf_counter() - t0
    with open(os.path.join(out_dir, "command.json"), "w") as f:
        json.dump({"argv": argv, "wall_s": wall_s}, f)
    return {**summary(find_run(out_dir)), "command": " ".join(argv), "wall_s": wall_s}


def checks(results: dict) -> list[dict]:
    """The defaults' promises (the module's docstring), each {check, run, passed, values}."""
    out = []

    def check(name, run, passed, **values):
        out.append({"check": name, "run": run, "passed": bool(passed), **values})

    for s in (1, 2, 3):
        r, run = results[f"grpo_seed{s}"], f"grpo_seed{s}"
        (d0, d1), (r0, r1), (c0, c1) = r["eval/distinct"], r["eval/reward"], r["eval/correct"]
        check("headline: >= 0.9 distinct names at the end", run, d1 >= 0.9, distinct=[d0, d1])
        check("headline: eval/reward up by >= 0.15", run, r1 - r0 >= 0.15, reward=[r0, r1])
        check("headline: eval/correct not below the start", run, c1 >= c0, correct=[c0, c1])
        check("headline: no collapse line", run, not r["collapse_lines"], lines=r["collapse_lines"][:1])
    for run in ("dpo", "rloo_seed1", "rloo_seed2", "rloo_seed3", "ppo", "sft"):
        (r0, r1), (c0, c1) = results[run]["eval/reward"], results[run]["eval/correct"]
        check("default: eval/reward up by >= 0.05", run, r1 - r0 >= 0.05, reward=[r0, r1])
        check("default: eval/correct at most 0.02 below the start", run, c1 >= c0 - 0.02, correct=[c0, c1])
    lines = results["hack"]["collapse_lines"]
    check("reward hacking: the collapse line", "hack", lines, lines=lines[:1], count=len(lines))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="/tmp/bench-runs/defaults")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time")
    p.add_argument("--threads", type=int, default=1, help="threads per run")
    p.add_argument("--python", default=sys.executable)
    a = p.parse_args()
    subprocess.run([a.python, "-m", "common.tasks", "basic-colours", BASIC], cwd=ROOT, check=True)
    with ThreadPoolExecutor(a.jobs) as pool:
        futures = {name: pool.submit(run, name, argv, a.output_dir, a.python, a.threads) for name, argv in RUNS.items()}
        results = {name: f.result() for name, f in futures.items()}
    rm_model = os.path.join(results["reward_model"]["run_dir"], "model")
    results["rm_ppo"] = run("rm_ppo", [*RM_PPO, "--reward-model", rm_model], a.output_dir, a.python, a.threads)
    verdicts = checks(results)
    with open(os.path.join(RESULTS, "defaults.json"), "w") as f:
        json.dump({**results, "checks": verdicts}, f, indent=1)
    for name, r in results.items():
        quoted = {k: [round(x, 3) for x in v] if isinstance(v, list) else {kk: round(vv, 3) for kk, vv in v.items()}
                  for k, v in r.items() if k.startswith(("eval/", "train/", "logps/", "rewards/"))}
        print(f"{name:14s} {r['wall_s']:5.0f} s  steps {r['steps']}  {quoted}")
    for v in verdicts:
        values = {k: [round(x, 3) if isinstance(x, float) else x for x in value] if isinstance(value, list) else value
                  for k, value in v.items() if k not in ("check", "run", "passed")}
        print(f"{'PASS' if v['passed'] else 'FAIL'} {v['check']} ({v['run']}): {values}")
    sys.exit(0 if all(v["passed"] for v in verdicts) else 1)


if __name__ == "__main__":
    main()
