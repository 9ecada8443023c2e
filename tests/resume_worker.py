"""Runs an algorithm script's main() and stops the process at a chosen moment, as a crash would.

    python tests/resume_worker.py grpo 2 --total-steps 4 ...         exits right after step 2's checkpoint
    python tests/resume_worker.py grpo latest:1 --total-steps 4 ...  SIGKILLs itself at a moment (MOMENTS)

A moment NAME:n kills the process with SIGKILL, which no Python code sees, as `kill -9` from outside would,
just before the n-th call (counted from this process's start) of:
    sample      the script's sampler: mid-step, the step's prompts drawn
    generate    the eval's sampler: mid-eval, nothing of it logged
    save_atomic the eval's model save: its metrics and samples logged, the model not saved
    save_model  a checkpoint's weights: mid-save, the checkpoint half written in step-K.tmp
    latest      the switch of checkpoints/latest: step-K.tmp already renamed to step-K
    prune       the removal of a checkpoint older than `latest` (now moved on): with one of its files gone
The step form runs under torchrun too (tests/test_ddp.py: every rank dies at the same point):
    python -m torch.distributed.run --nproc_per_node 2 tests/resume_worker.py grpo 2 --total-steps 4 ...
"""

import importlib
import os
import re
import shutil
import signal
import sys

import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def die_at(owner, name: str, n: int, counts=lambda *args: True, first=lambda *args: None) -> None:
    """owner.name, at its n-th call that `counts`, runs `first` and then SIGKILLs this process."""
    function, calls = getattr(owner, name), [0]

    def dying(*args, **kwargs):
        if counts(*args):
            calls[0] += 1
            if calls[0] == n:
                first(*args)
                os.kill(os.getpid(), signal.SIGKILL)
        return function(*args, **kwargs)

    setattr(owner, name, dying)


def is_older_checkpoint(path, *args) -> bool:
    """path: a checkpoint older than the one checkpoints/latest names (not a leftover of a newer one)."""
    step = re.fullmatch(r"step-(\d+)", os.path.basename(path))
    latest = os.path.join(os.path.dirname(path), "latest")
    if not (step and os.path.isdir(path) and os.path.isfile(latest)):
        return False
    with open(latest) as f:
        return int(step[1]) < int(f.read().strip().removeprefix("step-"))


def remove_a_file(path, *args) -> None:
    os.remove(os.path.join(path, min(os.listdir(path))))


if __name__ == "__main__":
    import common.run
    import common.task
    from common.run import Run

    module, moment = importlib.import_module(sys.argv[1]), sys.argv[2]
    if moment.isdigit():  # right after the checkpoint of step `moment`
        save, stop_after = Run.save_checkpoint, int(moment)

        def save_then_die(run, step, state):
            save(run, step, state)
            if step == stop_after:
                os._exit(3)

        Run.save_checkpoint = save_then_die
    else:
        name, n = moment.split(":")
        MOMENTS = {
            "sample": (module, "sample", {}),
            "generate": (common.task, "generate", {}),
            "save_atomic": (common.run, "save_atomic", {}),
            "save_model": (common.run, "save_model", {}),
            "latest": (os, "replace", {"counts": lambda source, target: target.endswith(f"{os.sep}latest")}),
            "prune": (shutil, "rmtree", {"counts": is_older_checkpoint, "first": remove_a_file}),
        }
        owner, attribute, when = MOMENTS[name]
        die_at(owner, attribute, int(n), **when)
    module.main(tyro.cli(module.Args, args=sys.argv[3:]))
