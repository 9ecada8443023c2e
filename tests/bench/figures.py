"""The README's two GRPO figures, from fresh runs (one process at a time, OMP_NUM_THREADS=1).

(a) reward_hacking.png: grpo.py --judge unhinged --learning-rate 5e-4 (400 steps, defaults otherwise) for
    beta 0, 0.04, 0.1, 0.2: eval/reward, eval/distinct and the mean words per eval name (samples.jsonl)
    against the step. --eval-every 25 only adds eval points: the eval forks the random stream, so the
    training is the same as the README's commands (which evaluate every 100 steps).
(b) painters.png: grpo.py --judge poet+correct / architect+correct / unhinged+correct (defaults, seed 1):
    colour swatches of the first held-out eval hexes with the untrained painter's name (step 0) and each
    painter's name after 400 steps (the eval's samples, T = 1, eval seed 0).

A run is reused when its folder under --output-dir holds a finished run with the same arguments.

    /tmp/bench-venv/bin/python tests/bench/figures.py                  # runs what is missing, then draws
    /tmp/bench-venv/bin/python tests/bench/figures.py --only hacking   # or: painters
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from curves import RESULTS, eval_rows, find_run, run_script, save_small  # noqa: E402

BETAS = [0.0, 0.04, 0.1, 0.2]
HACK_ARGS = ["--judge", "unhinged", "--learning-rate", "5e-4", "--total-steps", "400", "--eval-every", "25", "--seed", "1"]
PAINTERS = ["poet+correct", "architect+correct", "unhinged+correct"]


def finished(out_dir: str, args: list[str]) -> str | None:
    """The run in out_dir if it finished with these arguments (flags compared as the script saved them)."""
    run_dir = find_run(out_dir)
    if not run_dir or not os.path.exists(os.path.join(run_dir, "args.json")):
        return None
    with open(os.path.join(run_dir, "args.json")) as f:
        saved = json.load(f)
    wanted = dict(zip(args[::2], args[1::2]))
    for flag, value in wanted.items():
        key = flag[2:].replace("-", "_")
        if str(saved.get(key)) != value and not _same_number(saved.get(key), value):
            return None
    rows = eval_rows(run_dir)
    return run_dir if rows and rows[-1]["step"] == saved["total_steps"] else None


def _same_number(a, b) -> bool:
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return False


def get_run(out_dir: str, args: list[str], python: str, threads: int) -> str:
    run_dir = finished(out_dir, args)
    if run_dir:
        print(f"reusing {run_dir}")
        return run_dir
    res = run_script("grpo.py", args, out_dir, python, threads)
    print(f"  done in {res['wall_s']:.0f} s: {res['run_dir']}", flush=True)
    return res["run_dir"]


def samples(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "samples.jsonl")) as f:
        return [json.loads(line) for line in f]


def words_per_name(run_dir: str) -> dict[int, float]:
    by_step: dict[int, list[int]] = {}
    for s in samples(run_dir):
        by_step.setdefault(s["step"], []).append(len(s["completion"].split()))
    return {step: sum(n) / len(n) for step, n in sorted(by_step.items())}


def hacking_figure(runs: dict[float, str], path: str) -> dict:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    colors = ["tab:red", "tab:orange", "tab:blue", "tab:green"]
    out = {}
    for (beta, run_dir), color in zip(runs.items(), colors):
        rows = eval_rows(run_dir)
        words = words_per_name(run_dir)
        steps = [r["step"] for r in rows]
        series = {"step": steps, "reward": [r["eval/reward"] for r in rows], "distinct": [r["eval/distinct"] for r in rows],
                  "words_per_name": [words[s] for s in steps]}
        final = [s["completion"] for s in samples(run_dir) if s["step"] == steps[-1]]
        series["final_names"] = final[:6]
        out[str(beta)] = {"run_dir": run_dir, **series}
        label = f"β = {beta:g}"
        for ax, key in zip(axes, ("reward", "distinct", "words_per_name")):
            ax.plot(steps, series[key], color=color, lw=1.8, marker="o", ms=2.5, label=label)
    for ax, title in zip(axes, ("eval/reward (unhinged judge)", "eval/distinct (share of distinct names)",
                                "mean words per eval name")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[1].set_ylim(-0.02, 1.05)
    axes[2].axhline(8, color="k", lw=0.6, ls=":")
    axes[2].text(0.02, 7.75, "--max-new-tokens 8", fontsize=7, va="top", transform=axes[2].get_yaxis_transform())
    axes[0].legend(fontsize=8)
    fig.suptitle("Reward hacking: grpo.py --judge unhinged --learning-rate 5e-4 --beta β (k3 KL in the loss), seed 1; "
                 "evals of 64 held-out hexes every 25 steps", fontsize=10)
    fig.tight_layout()
    save_small(fig, path)
    plt.close(fig)
    return out


def painters_figure(runs: dict[str, str], path: str, n_hexes: int = 10) -> dict:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    first = samples(next(iter(runs.values())))
    start = [s for s in first if s["step"] == 0][:n_hexes]
    columns = {"painter (untrained, step 0)": [s["completion"] for s in start]}
    for judge, run_dir in runs.items():
        rows = samples(run_dir)
        last = max(s["step"] for s in rows)
        by_prompt = {s["prompt"]: s["completion"] for s in rows if s["step"] == last}
        assert [s["completion"] for s in rows if s["step"] == 0][:n_hexes] == columns["painter (untrained, step 0)"]
        ev = eval_rows(run_dir)
        columns[f"GRPO {judge}\neval/reward {ev[0]['eval/reward']:.3f} → {ev[-1]['eval/reward']:.3f} (step {last})"] = \
            [by_prompt[s["prompt"]] for s in start]
    hexes = [s["prompt"][-7:] for s in start]

    widths = [1.3] + [2.6] * len(columns)
    fig, ax = plt.subplots(figsize=(sum(widths) * 0.95, 0.42 * (n_hexes + 1.2) + 0.3))
    ax.set_xlim(0, sum(widths))
    ax.set_ylim(n_hexes + 1, -0.2)
    ax.axis("off")
    x = widths[0]
    ax.text(widths[0] / 2, 0.25, "hex", ha="center", va="center", fontsize=9, weight="bold")
    for (title, _), w in zip(columns.items(), widths[1:]):
        head, *rest = title.split("\n")
        ax.text(x + 0.1, 0.25, head, ha="left", va="center", fontsize=9, weight="bold")
        if rest:
            ax.text(x + 0.1, 0.7, rest[0], ha="left", va="center", fontsize=7.5, color="0.3")
        x += w
    for i, h in enumerate(hexes):
        y = i + 1
        rgb = tuple(int(h[k:k + 2], 16) / 255 for k in (1, 3, 5))
        ax.add_patch(Rectangle((0.05, y + 0.06), widths[0] - 0.1, 0.88, color=rgb))
        light = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] > 0.55
        ax.text(widths[0] / 2, y + 0.5, h, ha="center", va="center", fontsize=8, family="monospace",
                color="black" if light else "white")
        x = widths[0]
        for names, w in zip(columns.values(), widths[1:]):
            ax.text(x + 0.1, y + 0.5, names[i], ha="left", va="center", fontsize=8.5)
            x += w
    fig.suptitle("Three painters: grpo.py with three judges (400 steps, seed 1); names sampled at T = 1 for held-out hexes",
                 fontsize=9.5)
    fig.tight_layout()
    save_small(fig, path)
    plt.close(fig)
    return {"hexes": hexes, "names": {k.split("\n")[0]: v for k, v in columns.items()}, "runs": runs,
            "eval_reward": {j: [eval_rows(r)[0]["eval/reward"], eval_rows(r)[-1]["eval/reward"]] for j, r in runs.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["hacking", "painters"], default=None)
    p.add_argument("--output-dir", default="/tmp/bench-runs")
    p.add_argument("--results-dir", default=RESULTS)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--python", default=sys.executable)
    a = p.parse_args()
    os.makedirs(a.results_dir, exist_ok=True)
    summary_path = os.path.join(a.results_dir, "figures.json")
    summary = json.load(open(summary_path)) if os.path.exists(summary_path) else {}
    if a.only in (None, "hacking"):
        runs = {b: get_run(os.path.join(a.output_dir, "hacking", f"beta{b:g}"), [*HACK_ARGS, "--beta", f"{b:g}"],
                           a.python, a.threads) for b in BETAS}
        summary["reward_hacking"] = hacking_figure(runs, os.path.join(a.results_dir, "reward_hacking.png"))
        for b, s in summary["reward_hacking"].items():
            print(f"beta {b}: distinct {' '.join(f'{d:.2f}' for d in s['distinct'][::4])} (every 100 steps), words "
                  f"{s['words_per_name'][0]:.1f} -> {s['words_per_name'][-1]:.1f}, reward {s['reward'][0]:.3f} -> "
                  f"{s['reward'][-1]:.3f}; {s['final_names'][:3]}")
    if a.only in (None, "painters"):
        runs = {j: get_run(os.path.join(a.output_dir, "painters", j.replace("+", "_")), ["--judge", j, "--seed", "1"],
                           a.python, a.threads) for j in PAINTERS}
        summary["painters"] = painters_figure(runs, os.path.join(a.results_dir, "painters.png"))
        for title, names in summary["painters"]["names"].items():
            print(f"{title:28s} " + " | ".join(names))
        print({j: [round(v, 3) for v in r] for j, r in summary["painters"]["eval_reward"].items()})
    with open(summary_path, "w") as f:
        json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
