"""The README's GRPO figures and the painters' matrix, from fresh runs (one process at a time, OMP_NUM_THREADS=1).

(a) reward_hacking.png: paper GRPO, grpo.py --judge unhinged --scale-rewards group --learning-rate 5e-4
    (400 steps, eval of 256 held-out hexes
    every 25 steps, seed 1) at beta 0 (the hack) and beta 0.2, and --judge unhinged+correct at beta 0 (the
    mitigation): the share of distinct names, the share of the three commonest names, and eval/reward against
    the step, and per colour region (the hex's nearest basic colour term) the commonest final name.
    --eval-every only adds eval points: the eval forks the random stream, so the training is the same.
(b) painters.png and the 3x3 matrix: for each taste X (poet, architect, unhinged) the painters' recipe, the same
    settings for the three, seeds 1, 2, 3 (the seed of both training steps):
      python -m common.tasks top-names DIR --judge X   (the training names X scores in its top tenth, of which
                                                        those whose words describe their colour)
      python sft.py --model common/painter --data DIR/train.jsonl --eval-data DIR/eval.jsonl --judge X+correct WARM_UP
      python grpo.py --model <the warm-up's model> --judge X+correct PAINTER_RECIPE
    Each painter's final eval names (the 64 held-out hexes, T = 1, eval seed 0) are scored by poet, architect,
    unhinged and correct, with the share of distinct names and of names that repeat a word; means (and sd) over
    the seeds. The base row is the shipped painter's step-0 eval (the warm-ups' step 0), the warm-up rows each
    warm-up's final eval (GRPO's step 0). The figure shows seed 1's names for the first ten hexes, and the
    matrix beside them.

A run is reused when its folder under --output-dir holds a finished run with the same arguments. Two runs go at a
time, one thread each (--jobs, --threads): the training does not depend on the machine's load.

    /tmp/bench-venv/bin/python tests/bench/figures.py                  # runs what is missing, then draws
    /tmp/bench-venv/bin/python tests/bench/figures.py --only hacking   # or: painters
"""
import argparse
import json
import os
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from curves import RESULTS, ROOT, child_env, eval_rows, find_run, run_script, save_small  # noqa: E402

sys.path.insert(0, ROOT)
from common.judges import WORD_RE  # noqa: E402
from common.task import get_judge  # noqa: E402
from common.tasks import basic_colour  # noqa: E402

HACK_BASE = ["--scale-rewards", "group", "--learning-rate", "5e-4", "--total-steps", "400", "--eval-every", "25", "--eval-size", "256", "--seed", "1"]
HACK_RUNS = {
    "unhinged, β 0": ["--judge", "unhinged", "--beta", "0", *HACK_BASE],
    "unhinged, β 0.2": ["--judge", "unhinged", "--beta", "0.2", *HACK_BASE],
    "unhinged+correct, β 0": ["--judge", "unhinged+correct", "--beta", "0", *HACK_BASE],
}
PAINTERS = ["poet+correct", "architect+correct", "unhinged+correct"]
# the painters' recipe, the same for every taste: a short SFT warm-up on the taste's own names (from the shipped
# painter), then GRPO with Dr. GRPO's advantages (no std) and a KL penalty, to the warmed-up model, that binds
WARM_UP = ["--total-steps", "150", "--warmup-steps", "10", "--learning-rate", "1e-3"]
PAINTER_RECIPE = ["--scale-rewards", "none", "--beta", "0.1", "--learning-rate", "1e-3", "--total-steps", "600"]
SEEDS = [1, 2, 3]
MATRIX_JUDGES = ["poet", "architect", "unhinged", "correct"]


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


def say(line: str) -> None:
    """One write per line, so that the runs' threads never print into each other's lines."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def get_run(out_dir: str, args: list[str], python: str, threads: int, script: str = "grpo.py") -> str:
    run_dir = finished(out_dir, args)
    if run_dir:
        say(f"reusing {run_dir}")
        return run_dir
    res = run_script(script, args, out_dir, python, threads)
    say(f"  done in {res['wall_s']:.0f} s: {res['run_dir']}")
    return res["run_dir"]


def get_names(out_dir: str, taste: str, python: str, threads: int) -> str:
    """python -m common.tasks top-names out_dir --judge taste, unless out_dir holds its finished output."""
    cmd = [python, "-m", "common.tasks", "top-names", out_dir, "--judge", taste]
    done = os.path.join(out_dir, "command.json")
    if os.path.exists(done) and json.load(open(done)) == cmd[1:]:
        say(f"reusing {out_dir}")
        return out_dir
    say("$ OMP_NUM_THREADS=%d %s" % (threads, " ".join(cmd[1:])))
    subprocess.run(cmd, cwd=ROOT, env=child_env(threads), check=True, stdout=subprocess.DEVNULL)
    json.dump(cmd[1:], open(done, "w"))
    return out_dir


def samples(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "samples.jsonl")) as f:
        return [json.loads(line) for line in f]


def names_by_step(run_dir: str) -> dict[int, list[dict]]:
    by_step: dict[int, list[dict]] = {}
    for row in samples(run_dir):
        by_step.setdefault(row["step"], []).append(row)
    return dict(sorted(by_step.items()))


def repeats_a_word(name: str) -> bool:
    words = WORD_RE.findall(name.lower())
    return len(words) != len(set(words))


def collapse(names: list[str], top: int = 3) -> dict:
    counts = Counter(names)
    return {"distinct": len(counts) / len(names), f"top{top}_share": sum(n for _, n in counts.most_common(top)) / len(names),
            "words_per_name": float(np.mean([len(n.split()) for n in names]))}


def regions(rows: list[dict], min_hexes: int = 8) -> dict:
    """Per basic colour region (the hex's nearest basic term) with at least min_hexes hexes: the commonest
    name and how many of the region's hexes got it."""
    by_region: dict[str, list[str]] = {}
    for row in rows:
        by_region.setdefault(basic_colour(row["prompt"][-7:]), []).append(row["completion"])
    out = {}
    for region, names in sorted(by_region.items(), key=lambda kv: -len(kv[1])):
        if len(names) >= min_hexes:
            name, n = Counter(names).most_common(1)[0]
            out[region] = {"name": name, "count": n, "hexes": len(names)}
    return out


def hacking_figure(runs: dict[str, str], path: str) -> dict:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    colors = ["tab:red", "tab:blue", "tab:green", "tab:orange"]
    out = {}
    for (label, run_dir), color in zip(runs.items(), colors):
        by_step = names_by_step(run_dir)
        rows = {r["step"]: r for r in eval_rows(run_dir)}
        steps = list(by_step)
        stats = [collapse([r["completion"] for r in by_step[s]]) for s in steps]
        series = {"step": steps, "reward": [rows[s]["eval/reward"] for s in steps],
                  "distinct": [x["distinct"] for x in stats], "top3_share": [x["top3_share"] for x in stats],
                  "words_per_name": [x["words_per_name"] for x in stats], "kl": [rows[s].get("eval/kl") for s in steps]}
        final = by_step[steps[-1]]
        out[label] = {"run_dir": run_dir, **series, "final_names": [r["completion"] for r in final[:8]],
                      "regions": regions(final)}
        for ax, key in zip(axes, ("distinct", "top3_share", "reward")):
            ax.plot(steps, series[key], color=color, lw=1.8, marker="o", ms=2.5, label=label)
    for ax, title in zip(axes, ("share of distinct names", "share of the 3 commonest names", "eval/reward (its judge)")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylim(-0.02, 1.05)
    axes[1].set_ylim(-0.02, 1.05)
    axes[0].legend(fontsize=8)
    fig.suptitle("Reward hacking: grpo.py --scale-rewards group --learning-rate 5e-4, seed 1; names for 256 held-out hexes every 25 steps",
                 fontsize=10)
    fig.tight_layout()
    save_small(fig, path)
    plt.close(fig)
    return out


def painter_scores(rows: list[dict], judges: dict) -> dict:
    prompts, names = [r["prompt"] for r in rows], [r["completion"] for r in rows]
    scores = {j: float(np.mean(judge(prompts, names))) for j, judge in judges.items()}
    return {**scores, "distinct": len(set(names)) / len(names), "repeated_word": float(np.mean([repeats_a_word(n) for n in names]))}


def matrix(runs: dict[str, list[str]], warm_ups: dict[str, list[str]]) -> dict:
    """Rows: the base painter (the warm-ups' step 0), each warm-up (its final eval) and each painter (GRPO's
    final eval); columns: MATRIX_JUDGES, distinct, repeated_word; mean and sd over the seeds' runs."""
    judges = {j: get_judge(j, "cpu") for j in MATRIX_JUDGES}
    base = names_by_step(warm_ups[PAINTERS[0]][0])[0]
    table = {"base": {k: [v] for k, v in painter_scores(base, judges).items()}}
    for painter in runs:
        for row, run_dirs in ((f"{painter.split('+')[0]} warm-up", warm_ups[painter]), (painter, runs[painter])):
            per_seed = []
            for run_dir in run_dirs:
                by_step = names_by_step(run_dir)
                if run_dirs is warm_ups[painter]:  # one base eval: every warm-up starts from the shipped painter
                    assert [r["completion"] for r in by_step[0]] == [r["completion"] for r in base]
                per_seed.append(painter_scores(by_step[max(by_step)], judges))
            table[row] = {k: [s[k] for s in per_seed] for k in per_seed[0]}
    return {row: {k: {"mean": float(np.mean(v)), "sd": float(np.std(v)), "values": v} for k, v in cols.items()}
            for row, cols in table.items()}


def matrix_markdown(m: dict) -> str:
    cols = [*MATRIX_JUDGES, "distinct", "repeated_word"]
    lines = ["| painter | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for row, values in m.items():
        cells = []
        for c in cols:
            v = values[c]
            cells.append(f"{v['mean']:+.3f} ± {v['sd']:.3f}" if row != "base" and c in MATRIX_JUDGES else
                         f"{v['mean']:.3f}" if c in MATRIX_JUDGES else f"{v['mean']:.2f}" if c == "distinct" else f"{v['mean']:.0%}")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def painters_figure(runs: dict[str, str], base_run: str, m: dict, path: str, n_hexes: int = 10) -> dict:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    start = [s for s in samples(base_run) if s["step"] == 0][:n_hexes]
    columns = {"base painter (step 0)": [s["completion"] for s in start]}
    for judge, run_dir in runs.items():
        rows = samples(run_dir)
        last = max(s["step"] for s in rows)
        by_prompt = {s["prompt"]: s["completion"] for s in rows if s["step"] == last}
        columns[f"{judge.split('+')[0]} painter"] = [by_prompt[s["prompt"]] for s in start]
    hexes = [s["prompt"][-7:] for s in start]

    widths = [1.3] + [2.6] * len(columns)
    fig, (ax, mx) = plt.subplots(1, 2, figsize=(sum(widths) * 0.95 + 6.2, 0.42 * (n_hexes + 1.2) + 0.5),
                                 gridspec_kw={"width_ratios": [sum(widths), 6.0]})
    ax.set_xlim(0, sum(widths))
    ax.set_ylim(n_hexes + 1, -0.2)
    ax.axis("off")
    x = widths[0]
    ax.text(widths[0] / 2, 0.25, "hex", ha="center", va="center", fontsize=9, weight="bold")
    for title, w in zip(columns, widths[1:]):
        ax.text(x + 0.1, 0.25, title, ha="left", va="center", fontsize=9, weight="bold")
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
    # the matrix: mean score of each painter's final names by each judge, over the seeds; the column's best in bold
    cols = [*MATRIX_JUDGES, "distinct", "repeated_word"]
    cells = [[f"{m[r][c]['mean']:+.3f}" if c in MATRIX_JUDGES else f"{m[r][c]['mean']:.2f}" if c == "distinct"
              else f"{m[r][c]['mean']:.0%}" for c in cols] for r in m]
    table = mx.table(cellText=cells, rowLabels=list(m), colLabels=["poet", "architect", "unhinged", "correct",
                     "distinct", "repeats"], loc="center", cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.scale(1.0, 1.5)
    rows = list(m)
    for j, c in enumerate(MATRIX_JUDGES[:3]):  # the best of the base and the three painters
        best = max((i for i, r in enumerate(rows) if r in ("base", *PAINTERS)), key=lambda i: m[rows[i]][c]["mean"])
        table[best + 1, j].set_text_props(weight="bold")
    mx.axis("off")
    mx.set_title(f"scored by each judge (64 held-out hexes, mean of seeds {', '.join(map(str, SEEDS))})", fontsize=8.5)
    fig.suptitle(f"Three painters: an SFT warm-up on the taste's top-tenth names ({' '.join(WARM_UP)}), then grpo.py "
                 f"--judge X+correct {' '.join(PAINTER_RECIPE)}\nnames sampled at T = 1 for held-out hexes (seed 1)",
                 fontsize=9.5)
    fig.tight_layout()
    save_small(fig, path)
    plt.close(fig)
    return {"hexes": hexes, "names": columns, "runs": runs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["hacking", "painters"], default=None)
    p.add_argument("--output-dir", default="/tmp/bench-runs")
    p.add_argument("--results-dir", default=RESULTS)
    p.add_argument("--threads", type=int, default=1, help="threads per run")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (the results do not depend on it)")
    p.add_argument("--python", default=sys.executable)
    a = p.parse_args()
    os.makedirs(a.results_dir, exist_ok=True)
    summary_path = os.path.join(a.results_dir, "figures.json")
    summary = json.load(open(summary_path)) if os.path.exists(summary_path) else {}
    wanted = {}  # (part, label) -> (out_dir, args)
    if a.only in (None, "hacking"):
        for label, args in HACK_RUNS.items():
            wanted["hacking", label] = (os.path.join(a.output_dir, "hacking", label.replace(" ", "").replace(",", "_")), args)
    with ThreadPoolExecutor(a.jobs) as pool:
        done = {key: pool.submit(get_run, out, args, a.python, a.threads) for key, (out, args) in wanted.items()}
        if a.only in (None, "painters"):  # the three steps of each painter's recipe, each step's runs in parallel
            painters = os.path.join(a.output_dir, "painters")
            names = {j: pool.submit(get_names, os.path.join(painters, "names_" + j.split("+")[0]), j.split("+")[0],
                                    a.python, a.threads) for j in PAINTERS}
            names = {j: f.result() for j, f in names.items()}
            warm = {}
            for j in PAINTERS:
                for seed in SEEDS:
                    args = ["--model", "common/painter", "--data", os.path.join(names[j], "train.jsonl"), "--eval-data",
                            os.path.join(names[j], "eval.jsonl"), "--judge", j, *WARM_UP, "--seed", str(seed)]
                    out = os.path.join(painters, f"{j.replace('+', '_')}_seed{seed}", "warm_up")
                    warm[j, seed] = pool.submit(get_run, out, args, a.python, a.threads, "sft.py")
            warm = {key: f.result() for key, f in warm.items()}
            for (j, seed), warm_dir in warm.items():
                args = ["--model", os.path.join(warm_dir, "model"), "--judge", j, *PAINTER_RECIPE, "--seed", str(seed)]
                out = os.path.join(painters, f"{j.replace('+', '_')}_seed{seed}", "grpo")
                done["painters", (j, seed)] = pool.submit(get_run, out, args, a.python, a.threads)
        done = {key: f.result() for key, f in done.items()}
    if a.only in (None, "hacking"):
        runs = {label: done["hacking", label] for label in HACK_RUNS}
        summary["reward_hacking"] = hacking_figure(runs, os.path.join(a.results_dir, "reward_hacking.png"))
        for label, s in summary["reward_hacking"].items():
            print(f"{label}: distinct {' '.join(f'{d:.2f}' for d in s['distinct'][::4])} (every 100 steps), top-3 share "
                  f"{s['top3_share'][0]:.2f} -> {s['top3_share'][-1]:.2f}, reward {s['reward'][0]:.3f} -> {s['reward'][-1]:.3f}")
            print("   " + "; ".join(f"{r}: {v['name']} ({v['count']}/{v['hexes']})" for r, v in s["regions"].items()))
    if a.only in (None, "painters"):
        runs = {j: [done["painters", (j, seed)] for seed in SEEDS] for j in PAINTERS}
        warm_ups = {j: [warm[j, seed] for seed in SEEDS] for j in PAINTERS}
        m = matrix(runs, warm_ups)
        summary["painters_matrix"] = m
        summary["painters"] = painters_figure({j: r[0] for j, r in runs.items()}, warm_ups[PAINTERS[0]][0], m,
                                              os.path.join(a.results_dir, "painters.png"))
        for title, names in summary["painters"]["names"].items():
            print(f"{title:28s} " + " | ".join(names))
        print(matrix_markdown(m))
    with open(summary_path, "w") as f:
        json.dump(summary, f, indent=1, ensure_ascii=False)


if __name__ == "__main__":
    main()
