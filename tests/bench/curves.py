"""Learning curves of the six methods at an equal wall-clock budget, from the shipped painter.

Every method starts from common/painter, is judged by the same judge (poet+correct) on the same eval
(the 64 held-out hexes, T = 1, max 8 new tokens, eval seed 0: step 0 is identical for all), and gets the
same wall-clock budget of *training* seconds, as each script measures it (`perf/train_s` of its eval rows:
wall clock since the script started, evals left out; model and judge loading, pair building and the
steps count). Each script is started with many steps and frequent evals; this file watches its
metrics.jsonl and terminates it once an eval row's perf/train_s reaches the budget. The value "at the
budget" is the last eval row with perf/train_s <= budget.

    sft        sft.py --model common/painter --learning-rate 1e-4   (continued SFT on the colour data;
               it never sees the judge, which only scores its eval)
    dpo        dpo.py --judge poet+correct   (the default pair building: 2048 hexes x 4 names ranked by
               the judge, counts against the budget; epochs raised so the pairs never run out)
    grpo       grpo.py (defaults: 8 prompts x 8 names, no std in the advantages, beta 0.1)
    rloo       reinforce.py (defaults: RLOO baseline, k1 KL in the reward)
    ppo        ppo_rlhf.py with the judge as the score
    rm+ppo     reward_model.py --judge poet+correct --num-prompts 1024 --eval-prompts 128, run to the end,
               then ppo_rlhf.py --reward-model <it> for the budget minus the RM's perf/train_s; the RM is the
               training score, the judge only scores the eval

Samples seen = training examples the optimiser consumed: completions sampled and scored (GRPO, RLOO,
PPO), colour-name examples (SFT), preference pairs (DPO: pairs trained on; the names sampled and judged
to build them count in the time axis and in `judge_calls`, not in samples). rm+ppo: the RM's pairs
trained on plus PPO's completions. judge_calls = names the judge scored for training (not the eval).

    OMP_NUM_THREADS=1 /tmp/bench-venv/bin/python tests/bench/curves.py --budget-s 90 --seeds 1 2 3
    /tmp/bench-venv/bin/python tests/bench/curves.py --plot-only     # redraw from the saved runs
"""
import argparse
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

from compare_trl import child_env, machine  # the same child environment and machine record

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS = os.path.join(ROOT, "tests", "bench", "results")
JUDGE = "poet+correct"
EVAL = ["--max-new-tokens", "8"]  # every script's default (common.task.evaluate's max_new_tokens)

# name -> (script, extra args, samples per step, judge calls per step, judge calls before step 1)
METHODS = {
    "sft": ("sft.py", ["--model", "common/painter", "--learning-rate", "1e-4", "--warmup-steps", "10",
                       "--total-steps", "4000", "--judge", JUDGE, "--eval-every", "40", "--log-every", "20", *EVAL],
            64, 0, 0),
    "dpo": ("dpo.py", ["--judge", JUDGE, "--num-epochs", "8", "--eval-every", "16", "--log-every", "8", *EVAL],
            32, 0, 2048 * 4),
    "grpo": ("grpo.py", ["--judge", JUDGE, "--total-steps", "400", "--eval-every", "20", *EVAL], 64, 64, 0),
    "rloo": ("reinforce.py", ["--judge", JUDGE, "--total-steps", "400", "--eval-every", "20", *EVAL], 64, 64, 0),
    "ppo": ("ppo_rlhf.py", ["--judge", JUDGE, "--total-steps", "300", "--eval-every", "10", *EVAL], 32, 32, 0),
    "rm+ppo": ("ppo_rlhf.py", ["--judge", JUDGE, "--total-steps", "300", "--eval-every", "10", *EVAL], 32, 0, 0),
}
RM_ARGS = ["--judge", JUDGE, "--num-prompts", "1024", "--eval-prompts", "128"]
RM_PAIRS_PER_STEP, RM_JUDGE_CALLS = 64, 1024 * 4
COLORS = {"sft": "tab:gray", "dpo": "tab:purple", "grpo": "tab:blue", "rloo": "tab:green", "ppo": "tab:orange",
          "rm+ppo": "tab:red"}


def read_rows(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written
                break
    return rows


def eval_rows(run_dir: str) -> list[dict]:
    return [r for r in read_rows(run_dir) if "perf/train_s" in r]


def find_run(out_dir: str) -> str | None:
    runs = sorted(glob.glob(os.path.join(out_dir, "*__*__*__*")))
    return runs[-1] if runs else None


def run_script(script: str, args: list[str], out_dir: str, python: str, threads: int = 1,
               budget_s: float | None = None, poll_s: float = 0.25) -> dict:
    """Run `python script args --output-dir out_dir` (out_dir emptied first), one process, `threads` threads.
    With budget_s, terminate it once an eval row's perf/train_s >= budget_s. Returns run_dir, wall_s, stopped."""
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    cmd = [python, script, *args, "--output-dir", out_dir]
    sys.stdout.write("$ OMP_NUM_THREADS=%d %s\n" % (threads, " ".join(cmd[1:])))  # one write: threads print whole lines
    sys.stdout.flush()
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    with open(os.path.join(out_dir, "stdout.log"), "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(threads), stdout=log, stderr=subprocess.STDOUT)
        stopped = False
        while proc.poll() is None:
            time.sleep(poll_s)
            if budget_s is not None and (run_dir := find_run(out_dir)):
                rows = eval_rows(run_dir)
                if rows and rows[-1]["perf/train_s"] >= budget_s:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait()
                    stopped = True
    wall_s = time.perf_counter() - t0
    if proc.returncode and not stopped:
        with open(os.path.join(out_dir, "stdout.log")) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"{script} failed (exit {proc.returncode}):\n{tail}")
    run_dir = find_run(out_dir)
    step_s = sorted(r["perf/step_s"] for r in read_rows(run_dir) if "perf/step_s" in r)
    return {"run_dir": run_dir, "command": "OMP_NUM_THREADS=%d python %s" % (threads, " ".join(cmd[1:])), "wall_s": wall_s,
            "stopped_at_budget": stopped, "median_step_s": step_s[len(step_s) // 2] if step_s else None,
            "loadavg_1min": [load0, os.getloadavg()[0]]}


def run_method(method: str, seed: int, budget_s: float, out_root: str, python: str, threads: int) -> dict:
    script, args, per_step, judge_per_step, judge_upfront = METHODS[method]
    seed_args = ["--seed", str(seed)]
    out_dir = os.path.join(out_root, method.replace("+", "_"), f"seed{seed}")
    info = {"method": method, "seed": seed}
    offset_s, offset_samples, judge_upfront_total = 0.0, 0, judge_upfront
    if method == "rm+ppo":
        rm = run_script("reward_model.py", [*RM_ARGS, *seed_args], out_dir + "_rm", python, threads)
        rm_rows = eval_rows(rm["run_dir"])
        offset_s = rm_rows[-1]["perf/train_s"]
        offset_samples = rm_rows[-1]["step"] * RM_PAIRS_PER_STEP
        judge_upfront_total = RM_JUDGE_CALLS
        info["rm"] = {"run_dir": rm["run_dir"], "command": rm["command"], "wall_s": rm["wall_s"], "train_s": offset_s, "steps": rm_rows[-1]["step"],
                      "eval_accuracy": rm_rows[-1].get("eval/accuracy"), "eval_accuracy_step0": rm_rows[0].get("eval/accuracy")}
        args = [*args, "--reward-model", os.path.join(rm["run_dir"], "model")]
    res = run_script(script, [*args, *seed_args], out_dir, python, threads, max(budget_s - offset_s, 0.0))
    info.update(res)
    if method == "rm+ppo":
        info["wall_s"] += info["rm"]["wall_s"]
    info["points"] = points(res["run_dir"], per_step, judge_per_step, judge_upfront_total, offset_s, offset_samples)
    return info


def points(run_dir: str, per_step: int, judge_per_step: int, judge_upfront: int, offset_s: float = 0.0,
           offset_samples: int = 0) -> list[dict]:
    out = []
    for r in eval_rows(run_dir):
        out.append({"step": r["step"], "seconds": r["perf/train_s"] + offset_s, "samples": offset_samples + r["step"] * per_step,
                    "judge_calls": judge_upfront + r["step"] * judge_per_step, "reward": r["eval/reward"],
                    "correct": r["eval/correct"], "distinct": r["eval/distinct"]})
    return out


def at_budget(pts: list[dict], budget_s: float) -> dict:
    inside = [p for p in pts if p["seconds"] <= budget_s]
    return inside[-1] if inside else pts[0]


def mean_sd(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    sd = (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0
    return m, sd


def summarise(results: dict, budget_s: float) -> dict:
    summary = {}
    for method, runs in results.items():
        ends = [at_budget(r["points"], budget_s) for r in runs]
        summary[method] = {k: mean_sd([e[k] for e in ends]) for k in ("step", "samples", "judge_calls", "seconds",
                                                                     "reward", "correct", "distinct")}
        summary[method]["step0_reward"] = runs[0]["points"][0]["reward"]
        summary[method]["n_seeds"] = len(runs)
        if method == "rm+ppo":
            summary[method]["rm_train_s"] = mean_sd([r["rm"]["train_s"] for r in runs])
            summary[method]["rm_accuracy"] = mean_sd([r["rm"]["eval_accuracy"] for r in runs])
    return summary


def table(summary: dict) -> str:
    def f(ms, digits=3):
        m, sd = ms
        return f"{m:.{digits}f} ± {sd:.{digits}f}"

    lines = ["| method | steps in budget | samples seen | judge calls (training) | `eval/reward` | `eval/correct` | `eval/distinct` |",
             "|---|---|---|---|---|---|---|"]
    for method, s in summary.items():
        lines.append(f"| {method} | {f(s['step'], 0)} | {f(s['samples'], 0)} | {f(s['judge_calls'], 0)} | "
                     f"{f(s['reward'])} | {f(s['correct'])} | {f(s['distinct'])} |")
    return "\n".join(lines)


def interp(xs: list[float], ys: list[float], grid: list[float]) -> list[float]:
    import numpy as np
    return list(np.interp(grid, xs, ys))


def save_small(fig, path: str, max_kb: int = 150) -> None:
    """Save at dpi 100; if the PNG is over max_kb, re-save it with a 256-colour palette (no visible loss here)."""
    fig.savefig(path, dpi=100)
    if os.path.getsize(path) > max_kb * 1024:
        from PIL import Image
        Image.open(path).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def plot(results: dict, budget_s: float, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharey="row")
    for method, runs in results.items():
        color = COLORS.get(method)
        for col, xkey in enumerate(("seconds", "samples")):
            for row, ykey in enumerate(("reward", "distinct")):
                ax = axes[row, col]
                per_seed = [[p for p in r["points"] if p["seconds"] <= budget_s] or r["points"][:1] for r in runs]
                for pts in per_seed:  # thin per-seed lines
                    ax.plot([p[xkey] for p in pts], [p[ykey] for p in pts], color=color, lw=0.6, alpha=0.35)
                hi = min(max(p[xkey] for p in pts) for pts in per_seed)
                lo = max(min(p[xkey] for p in pts) for pts in per_seed)
                grid = np.linspace(lo, hi, 60) if hi > lo else np.array([lo])
                ys = np.array([interp([p[xkey] for p in pts], [p[ykey] for p in pts], grid) for pts in per_seed])
                ax.plot(grid, ys.mean(0), color=color, lw=2, label=f"{method}" if (row, col) == (0, 0) else None)
                ax.plot([grid[-1]], [ys.mean(0)[-1]], color=color, marker="o", ms=4)
                if xkey == "seconds":  # loading, pair building, the RM: the time before the first eval
                    ax.plot([0, lo], [np.mean([pts[0][ykey] for pts in per_seed])] * 2, color=color, lw=1, ls=":")
                if len(runs) > 1:
                    ax.fill_between(grid, ys.min(0), ys.max(0), color=color, alpha=0.12, lw=0)
    for row, ylabel in enumerate(("eval/reward (poet+correct)", "eval/distinct")):
        axes[row, 0].set_ylabel(ylabel)
    for col, xlabel in enumerate((f"training seconds (perf/train_s; budget {budget_s:g} s)",
                                  "samples seen (completions / examples / pairs; log scale above 1k)")):
        axes[1, col].set_xlabel(xlabel)
    for row in range(2):
        axes[row, 0].set_xlim(0, budget_s * 1.03)
        axes[row, 1].set_xscale("symlog", linthresh=1000, linscale=0.5)  # SFT's examples dwarf the RL samples
        top = max(p["samples"] for runs in results.values() for r in runs for p in r["points"])
        ticks = [t for t in (0, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000) if t <= top * 1.2]
        axes[row, 1].set_xticks(ticks)
        axes[row, 1].set_xticklabels([f"{t // 1000}k" if t >= 1000 else str(t) for t in ticks])
        axes[row, 1].set_xlim(0, top * 1.2)
    axes[0, 0].axvline(budget_s, color="k", lw=0.5, ls=":")
    axes[1, 0].axvline(budget_s, color="k", lw=0.5, ls=":")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    n = len(next(iter(results.values())))
    axes[0, 0].legend(fontsize=8, loc="upper left")
    fig.suptitle(f"Six methods from the shipped painter, judge poet+correct, {budget_s:g} s of training each, "
                 f"OMP_NUM_THREADS=1, {n} seed{'s' if n > 1 else ''}\nbold: mean up to the shortest seed; band: min-max; "
                 "thin: each seed; dotted: before the first eval (loading; pair building for dpo; the RM for rm+ppo)",
                 fontsize=10)
    fig.tight_layout()
    save_small(fig, path)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-s", type=float, default=90.0, help="training seconds (perf/train_s) per method and seed (default 90)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="default: 1 2 3")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every run")
    p.add_argument("--output-dir", default="/tmp/bench-runs/curves", help="the runs go here")
    p.add_argument("--results-dir", default=RESULTS, help="curves.png and curves.json go here")
    p.add_argument("--python", default=sys.executable, help="interpreter for the scripts")
    p.add_argument("--plot-only", action="store_true", help="redraw from the curves.json in --results-dir")
    a = p.parse_args()
    os.makedirs(a.results_dir, exist_ok=True)
    json_path = os.path.join(a.results_dir, "curves.json")

    if a.plot_only:
        with open(json_path) as f:
            saved = json.load(f)
        results, budget = {m: r for m, r in saved["runs"].items() if r}, saved["config"]["budget_s"]
    else:
        t0 = time.perf_counter()
        results, budget = {m: [] for m in a.methods}, a.budget_s
        saved = {"config": {"budget_s": budget, "seeds": a.seeds, "judge": JUDGE, "methods": {
                     m: {"script": METHODS[m][0], "args": METHODS[m][1], "samples_per_step": METHODS[m][2]} for m in a.methods},
                     "rm_args": RM_ARGS, "machine": {**machine(), "threads_per_run": a.threads, "one_process_at_a_time": True}, "command": " ".join(sys.argv)},
                 "runs": results}
        for seed in a.seeds:  # seeds outermost: a slow spell on the shared machine hits every method alike
            for method in a.methods:
                r = run_method(method, seed, budget, a.output_dir, a.python, a.threads)
                end = at_budget(r["points"], budget)
                print(f"  {method} seed {seed}: {end['step']} steps in {end['seconds']:.1f} s, eval/reward "
                      f"{end['reward']:.3f}, distinct {end['distinct']:.2f} (wall {r['wall_s']:.0f} s)", flush=True)
                results[method].append(r)
                saved["config"]["wall_s"] = time.perf_counter() - t0
                with open(json_path, "w") as f:  # partial results, in case the run is cut short
                    json.dump(saved, f, indent=1)
    saved["summary"] = summarise(results, budget)
    with open(json_path, "w") as f:
        json.dump(saved, f, indent=1)
    plot(results, budget, os.path.join(a.results_dir, "curves.png"))
    print(f"\nat the budget of {budget:g} s (mean ± sd over seeds {saved['config']['seeds']}):\n")
    print(table(saved["summary"]))
    if "rm+ppo" in saved["summary"]:
        s = saved["summary"]["rm+ppo"]
        print(f"\nrm+ppo: the reward model took {s['rm_train_s'][0]:.1f} ± {s['rm_train_s'][1]:.1f} s of the budget "
              f"(held-out agreement with the judge {s['rm_accuracy'][0]:.3f})")
    print(f"\nwall time of all runs: {saved['config'].get('wall_s', float('nan')) / 60:.1f} min; "
          f"saved {json_path} and curves.png")


if __name__ == "__main__":
    main()
