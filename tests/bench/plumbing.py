"""The share of each script's `main` that is plumbing, not the method, by a rule anyone can rerun, and the
names each script imports from common; with --before DIR, the same for another checkout.

    python tests/bench/plumbing.py [--before /path/to/old/checkout]

A code line of main (not blank, not a comment) counts as plumbing when it sets up or tears down the run
(process group, seeds, run folder, logger, resume, checkpoints), checks the command line, wraps the model for
DDP, times the step, prints, evaluates or saves, or sums a logged number over the ranks; a statement that
spans lines counts all its lines. The rule is a keyword match (PLUMBING below), so read it as an estimate.
"""

import argparse
import ast
import os
import re

SCRIPTS = ["sft.py", "reward_model.py", "dpo.py", "grpo.py", "reinforce.py", "ppo_rlhf.py"]
PLUMBING = re.compile(
    r"Run\(|run\.args|raise ValueError|run\.wrap|run_eval|evaluate\(|run\.begin|run\.end_step|run\.close|"
    r"check_finite|perf_counter|print\(|run\.active|start_model|init_distributed|Logger\(|log\.|"
    r"save_checkpoint|load_checkpoint|cleanup_distributed|del ddp_model|resumed_args|random\.seed|"
    r"manual_seed|default_rng|FloatingPointError|all_sum\(per_rank|all_sum\(torch\.stack\(\[loss|"
    r"rank_means|means = all_sum|DDP\(|frozen_copy|isfinite|state\.get|\"order\"|sampling_seed"
)


def count(path: str) -> tuple[int, int, list[str]]:
    source = open(path, encoding="utf-8").read()
    tree = ast.parse(source)
    names = sorted({a.name for node in tree.body if isinstance(node, ast.ImportFrom)
                    and (node.module or "").startswith("common") for a in node.names})
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    lines = source.splitlines()
    plumbing, code = set(), set()
    for node in ast.walk(main):
        if not isinstance(node, ast.stmt) or node is main:
            continue
        body_start = min((b.lineno for f in ("body", "orelse") for b in getattr(node, f, []) or []), default=None)
        end = (body_start - 1) if body_start else node.end_lineno
        span = range(node.lineno, end + 1)
        text = "\n".join(lines[i - 1] for i in span)
        statement = [i for i in span if lines[i - 1].strip() and not lines[i - 1].strip().startswith("#")]
        code.update(statement)
        if PLUMBING.search(text.split("#")[0] if "\n" not in text else text):
            plumbing.update(statement)
    return len(plumbing), len(code), names


def report(root: str, label: str) -> None:
    for script in SCRIPTS:
        plumbing, code, names = count(os.path.join(root, script))
        lines = len(open(os.path.join(root, script)).readlines())
        print(f"{label:6} {script:16} {lines:4} lines | main: {plumbing:3}/{code:3} plumbing "
              f"({plumbing / code:.0%}) | {len(names):2} names from common: {', '.join(names)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default=None, help="another checkout to compare with")
    cli = parser.parse_args()
    if cli.before:
        report(cli.before, "before")
    report(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "after")
