"""The GRPO family at one sample budget, from the shipped painter: which preset learns fastest here?

    OMP_NUM_THREADS=1 python tests/bench/grpo_family.py              # the runs missing under --output-dir, then
                                                                     # results/grpo_family.json and .png
    python tests/bench/grpo_family.py --plot-only                    # redraw from the saved json
    python tests/bench/grpo_family.py --quick                        # a smoke test: 3 tiny steps, one seed
                                                                     # (under --output-dir, with its own rows)

The presets are grpo.py's docstring lines (and RLOO, reinforce.py's defaults, for reference):
    paper GRPO  --scale-rewards group --loss-agg seq-mean --beta 0.04
    Dr. GRPO    --scale-rewards none --loss-agg constant --beta 0
    DAPO        --scale-rewards group --loss-agg token-mean --clip-eps-high 0.28 --beta 0 --mask-truncated
                --dynamic-sampling --judge TASK+overlong:8:4 (L_max = --max-new-tokens 8, L_cache = half)
    GSPO        --scale-rewards group --importance-sampling-level sequence --clip-eps-low 3e-4
                --clip-eps-high 4e-4 --beta 0 --num-iterations 2
    CISPO       --scale-rewards group --loss-agg token-mean --policy-loss cispo --clip-eps-high 4 --beta 0
    RLOO        reinforce.py
Learning rates: the presets that divide by the group's std take paper GRPO's 2e-4 (its docstring line: with
the std, any reward gap is +-1), Dr. GRPO the file's default 1e-3, RLOO reinforce.py's 2e-4.
NOTE: with one update per batch (every preset but GSPO) every ratio is 1, so the clip, clip-higher and CISPO's
cap change nothing: CISPO's run takes the gradient of GRPO with token-mean (tests/test_grpo.py), and DAPO's
differs from it only by its dynamic sampling, truncation mask and overlong term (with none of them at work, the
two runs are the same run).

Two tasks, seeds 1-3:
    basic-colours  the verifiable task (python -m common.tasks basic-colours; --judge answer): paid 1 only for
                   the basic colour term nearest the hex, so whole groups are often all right or all wrong
                   and dynamic sampling has work to do. Headline: held-out eval/accuracy.
    poet+correct   the default judge on the default prompts. Headline: the held-out eval/reward of poet+correct,
                   re-scored from each eval's samples for DAPO, whose own eval/reward also holds its overlong term.
Budget: every run samples the same number of completions, --samples (default 12,800: 200 steps of 8 prompts x 8
completions). Samples seen (the x axis) are completions SAMPLED, trained on or not: DAPO's dynamic sampling takes
extra batches, which count, and it is stopped once its samples reach the budget; the value "at the budget" is the
last eval with samples <= budget. Seconds: perf/train_s (training wall clock, evals and saves left out), one run
at a time with one thread (--jobs 1), as curves.py. A run is reused when its folder holds a finished run of the
same command (defaults.py's rule).
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from curves import RESULTS, ROOT, eval_rows, find_run, interp, mean_sd, read_rows, save_small  # noqa: E402
from compare_trl import child_env, machine  # noqa: E402
from defaults import BASIC  # noqa: E402  python -m common.tasks basic-colours writes it first

GROUP_STD = ["--scale-rewards", "group", "--beta", "0", "--learning-rate", "2e-4"]
PRESETS = {  # name -> (script, flags); DAPO's judge gets the overlong term (the task's judge + overlong:8:4)
    "paper GRPO": ("grpo.py", ["--scale-rewards", "group", "--loss-agg", "seq-mean", "--beta", "0.04",
                               "--learning-rate", "2e-4"]),
    "Dr. GRPO": ("grpo.py", ["--scale-rewards", "none", "--loss-agg", "constant", "--beta", "0"]),
    "DAPO": ("grpo.py", [*GROUP_STD, "--loss-agg", "token-mean", "--clip-eps-high", "0.28", "--mask-truncated",
                         "--dynamic-sampling"]),
    "GSPO": ("grpo.py", [*GROUP_STD, "--loss-agg", "seq-mean", "--importance-sampling-level", "sequence",
                         "--clip-eps-low", "3e-4", "--clip-eps-high", "4e-4", "--num-iterations", "2"]),
    "CISPO": ("grpo.py", [*GROUP_STD, "--loss-agg", "token-mean", "--policy-loss", "cispo", "--clip-eps-high", "4"]),
    "RLOO": ("reinforce.py", []),
}
OVERLONG = "overlong:8:4"  # DAPO's Eq. 13 at our --max-new-tokens 8: free up to 4 tokens, -1 at 8
TASKS = {  # name -> (flags ({data}: --basic-dir), the judge, the headline metric)
    "basic-colours": (["--prompts", "{data}/train.jsonl", "--eval-prompts", "{data}/eval.jsonl"], "answer",
                      "eval/accuracy"),
    "poet+correct": ([], "poet+correct", "eval/reward"),
}
COLORS = {"paper GRPO": "tab:blue", "Dr. GRPO": "tab:orange", "DAPO": "tab:red", "GSPO": "tab:purple",
          "CISPO": "tab:brown", "RLOO": "tab:green"}


def command(preset: str, task: str, seed: int, a) -> list[str]:
    """The script and its flags: the preset's, the task's, the shape, the seed; DAPO's judge adds overlong."""
    script, flags = PRESETS[preset]
    task_flags, judge, _ = TASKS[task]
    task_flags = [flag.format(data=a.basic_dir) for flag in task_flags]
    judge = f"{judge}+{OVERLONG}" if preset == "DAPO" else judge
    steps = a.samples // (a.batch_size * a.group_size)
    shape = ["--batch-size", str(a.batch_size), "--group-size", str(a.group_size), "--total-steps", str(steps),
             "--eval-every", str(a.eval_every), "--eval-size", str(a.eval_size), "--log-every", "1"]
    micro = ["--micro-batch-size", str(a.batch_size * a.group_size)]  # one pass over the batch, as the defaults
    return [script, *flags, *task_flags, "--judge", judge, *shape, *micro, "--seed", str(seed)]


def samples_by_step(run_dir: str, per_batch: int) -> dict[int, int]:
    """Completions sampled up to each logged step: one batch a step, plus DAPO's extra rounds (--log-every 1; a
    step whose batches held no group with a signal logs only these counts)."""
    total, out = 0, {0: 0}
    for row in read_rows(run_dir):
        if "train/loss" in row or "train/extra_rounds" in row:
            total += per_batch * (1 + row.get("train/extra_rounds", 0))
            out[row["step"]] = total
    return out


def sampled_so_far(run_dir: str, per_batch: int) -> int:
    return max(samples_by_step(run_dir, per_batch).values())


def run(preset: str, task: str, seed: int, a) -> dict:
    """One run (reused when finished with the same command), stopped once its samples reach the budget."""
    argv = command(preset, task, seed, a)
    out_dir = os.path.join(a.output_dir, task, preset.replace(" ", "_").replace(".", ""), f"seed{seed}")
    per_batch, saved_path = a.batch_size * a.group_size, os.path.join(out_dir, "command.json")
    done = find_run(out_dir)
    if done and os.path.exists(saved_path):
        with open(saved_path) as f:
            saved = json.load(f)
        if saved["argv"] == argv and eval_rows(done):
            return {**saved, "run_dir": done}
    subprocess.run(["rm", "-rf", out_dir])
    os.makedirs(out_dir)
    print(f"$ OMP_NUM_THREADS={a.threads} python " + " ".join(argv), flush=True)
    t0, stopped = time.perf_counter(), False
    with open(os.path.join(out_dir, "stdout.log"), "w") as log:
        proc = subprocess.Popen([a.python, *argv, "--output-dir", out_dir], cwd=ROOT, env=child_env(a.threads),
                                stdout=log, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            time.sleep(0.5)
            run_dir = find_run(out_dir)
            # DAPO's extra batches count: past the budget, stop (the others end on it, with their last eval)
            if run_dir and sampled_so_far(run_dir, per_batch) > a.samples:
                proc.send_signal(signal.SIGTERM)
                proc.wait()
                stopped = True
    if proc.returncode and not stopped:
        with open(os.path.join(out_dir, "stdout.log")) as f:
            raise RuntimeError(f"{' '.join(argv)} failed (exit {proc.returncode}):\n{f.read()[-3000:]}")
    saved = {"argv": argv, "wall_s": time.perf_counter() - t0, "stopped_at_budget": stopped}
    with open(saved_path, "w") as f:
        json.dump(saved, f)
    return {**saved, "run_dir": find_run(out_dir)}


def rescored(run_dir: str, judge_spec: str) -> dict[int, float]:
    """The mean of judge_spec over each eval's samples (samples.jsonl), by step: DAPO's eval/reward without its
    overlong term."""
    from common.task import get_judge

    judge, by_step = get_judge(judge_spec), {}
    with open(os.path.join(run_dir, "samples.jsonl")) as f:
        for row in map(json.loads, f):
            by_step.setdefault(row["step"], []).append(row)
    return {step: sum(judge([r["prompt"] for r in rows], [r["completion"] for r in rows])) / len(rows)
            for step, rows in by_step.items()}


def points(result: dict, preset: str, task: str, per_batch: int) -> list[dict]:
    """Per eval: step, samples sampled so far, training seconds, the headline; and the steps' dynamic sampling."""
    run_dir, (_, judge, headline) = result["run_dir"], TASKS[task]
    samples = samples_by_step(run_dir, per_batch)
    plain = rescored(run_dir, judge) if preset == "DAPO" and headline == "eval/reward" else None
    out = []
    for r in eval_rows(run_dir):
        if r["step"] not in samples:  # an eval after the last logged step (cut at the budget)
            continue
        value = plain[r["step"]] if plain is not None else r[headline]
        out.append({"step": r["step"], "samples": samples[r["step"]], "seconds": r["perf/train_s"], "value": value})
    return out


def at_budget(pts: list[dict], budget: int) -> dict:
    inside = [p for p in pts if p["samples"] <= budget]
    return inside[-1] if inside else pts[0]


def train_summary(run_dir: str) -> dict:
    """How much of each batch had no signal: the groups of equal rewards (DAPO drops them before training)."""
    rows = [r for r in read_rows(run_dir) if "train/loss" in r]
    out = {"frac_zero_std_trained": sum(r["train/frac_zero_std"] for r in rows) / max(len(rows), 1)}
    steps = [r for r in read_rows(run_dir) if "train/extra_rounds" in r]  # with the steps that kept nothing
    if steps:
        out["dropped_groups"] = sum(r["train/dropped_groups"] for r in steps)
        out["extra_rounds_per_step"] = sum(r["train/extra_rounds"] for r in steps) / len(steps)
        out["steps_without_update"] = len(steps) - len(rows)
    return out


def summarise(results: dict, budget: int) -> dict:
    summary = {}
    for task, by_preset in results.items():
        for preset, runs in by_preset.items():
            ends = [at_budget(r["points"], budget) for r in runs]
            s = {k: mean_sd([e[k] for e in ends]) for k in ("value", "seconds", "samples", "step")}
            s["start"] = runs[0]["points"][0]["value"]
            for key in ("frac_zero_std_trained", "dropped_groups", "extra_rounds_per_step"):
                if key in runs[0]["train"]:
                    s[key] = mean_sd([r["train"][key] for r in runs])
            summary.setdefault(task, {})[preset] = {**s, "n_seeds": len(runs)}
    return summary


def table(summary: dict) -> str:
    lines = []
    for task, by_preset in summary.items():
        lines += [f"\n{task} ({TASKS[task][2]}, held out; mean ± sd over seeds at the sample budget)\n",
                  "| preset | start | at the budget | training s | steps | DAPO: groups dropped, extra batches/step |",
                  "|---|---|---|---|---|---|"]
        for preset, s in by_preset.items():
            dynamic = (f"{s['dropped_groups'][0]:.0f}, {s['extra_rounds_per_step'][0]:.2f}"
                       if "dropped_groups" in s else "")
            lines.append(f"| {preset} | {s['start']:.3f} | {s['value'][0]:.3f} ± {s['value'][1]:.3f} | "
                         f"{s['seconds'][0]:.0f} | {s['step'][0]:.0f} | {dynamic} |")
    return "\n".join(lines)


def plot(results: dict, budget: int, path: str) -> None:
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is missing (pip install -r tests/bench/requirements.txt): no {path}; the json is saved")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(len(results), 2, figsize=(11, 4 * len(results)), squeeze=False, sharey="row")
    for row, (task, by_preset) in enumerate(results.items()):
        for col, xkey in enumerate(("samples", "seconds")):
            ax = axes[row, col]
            for preset, runs in by_preset.items():
                per_seed = [[p for p in r["points"] if p["samples"] <= budget] for r in runs]
                for pts in per_seed:  # thin: each seed
                    ax.plot([p[xkey] for p in pts], [p["value"] for p in pts], color=COLORS[preset], lw=0.6,
                            alpha=0.35)
                lo = max(pts[0][xkey] for pts in per_seed)
                hi = min(pts[-1][xkey] for pts in per_seed)
                grid = np.linspace(lo, hi, 60) if hi > lo else np.array([lo])
                ys = np.array([interp([p[xkey] for p in pts], [p["value"] for p in pts], grid) for pts in per_seed])
                ax.plot(grid, ys.mean(0), color=COLORS[preset], lw=2, label=preset)
            ax.grid(alpha=0.3)
        axes[row, 0].set_ylabel(f"{task}: held-out {TASKS[task][2]}")
    axes[-1, 0].set_xlabel(f"completions sampled (budget {budget:,}; DAPO's extra batches count)")
    axes[-1, 1].set_xlabel("training seconds (perf/train_s, one thread)")
    axes[0, 0].legend(fontsize=8, loc="lower right")
    n = len(next(iter(next(iter(results.values())).values())))
    fig.suptitle(f"The GRPO family from the shipped painter, {n} seed{'s' * (n > 1)}: bold the mean up to the "
                 "shortest seed, thin each seed", fontsize=10)
    fig.tight_layout()
    save_small(fig, path)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=12_800, help="completions sampled per run (default 12,800)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--eval-size", type=int, default=64)
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (1: the seconds compare)")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every run")
    p.add_argument("--output-dir", default="/tmp/bench-runs/grpo_family")
    p.add_argument("--basic-dir", default=BASIC, help="where python -m common.tasks basic-colours writes its rows")
    p.add_argument("--results-dir", default=RESULTS, help="grpo_family.json and .png go here")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--plot-only", action="store_true", help="redraw from the saved grpo_family.json")
    p.add_argument("--quick", action="store_true", help="a smoke test: 3 steps of 2 prompts x 4, one seed, "
                   "results under --output-dir (not tests/bench/results)")
    a = p.parse_args()
    if a.quick:
        a.samples, a.seeds, a.batch_size, a.group_size, a.eval_every, a.eval_size = 24, a.seeds[:1], 2, 4, 1, 8
        a.output_dir += "_quick"
        a.basic_dir = a.basic_dir if a.basic_dir != BASIC else os.path.join(a.output_dir, "basic_colours")
        a.results_dir = a.output_dir if a.results_dir == RESULTS else a.results_dir
    os.makedirs(a.results_dir, exist_ok=True)
    json_path = os.path.join(a.results_dir, "grpo_family.json")
    if a.plot_only:
        with open(json_path) as f:
            saved = json.load(f)
        plot(saved["runs"], saved["config"]["samples"], os.path.join(a.results_dir, "grpo_family.png"))
        print(table(saved["summary"]))
        return
    if "basic-colours" in a.tasks:
        subprocess.run([a.python, "-m", "common.tasks", "basic-colours", a.basic_dir], cwd=ROOT, check=True,
                       env=child_env(a.threads))
    t0, per_batch = time.perf_counter(), a.batch_size * a.group_size
    jobs = [(task, preset, seed) for seed in a.seeds for task in a.tasks for preset in a.presets]
    with ThreadPoolExecutor(a.jobs) as pool:  # seeds outermost: a slow spell of the machine hits every preset
        futures = {job: pool.submit(run, job[1], job[0], job[2], a) for job in jobs}
        done = {job: f.result() for job, f in futures.items()}
    results = {task: {preset: [] for preset in a.presets} for task in a.tasks}
    for (task, preset, seed), r in done.items():
        r.update(seed=seed, points=points(r, preset, task, per_batch), train=train_summary(r["run_dir"]))
        results[task][preset].append(r)
        end = at_budget(r["points"], a.samples)
        print(f"  {task} {preset} seed {seed}: {TASKS[task][2]} {r['points'][0]['value']:.3f} -> "
              f"{end['value']:.3f} at {end['samples']} samples, {end['seconds']:.0f} s", flush=True)
    config = {k: getattr(a, k) for k in ("samples", "seeds", "presets", "tasks", "batch_size", "group_size",
                                         "eval_every", "eval_size", "threads", "jobs")}
    config.update(presets_flags={k: PRESETS[k] for k in a.presets}, overlong=OVERLONG, machine=machine(),
                  command=" ".join(sys.argv), wall_s=time.perf_counter() - t0)
    saved = {"config": config, "runs": results, "summary": summarise(results, a.samples)}
    with open(json_path, "w") as f:
        json.dump(saved, f, indent=1)
    plot(results, a.samples, os.path.join(a.results_dir, "grpo_family.png"))
    print(table(saved["summary"]))
    print(f"\nwall time of all runs: {config['wall_s'] / 60:.1f} min; saved {json_path}")


if __name__ == "__main__":
    main()
