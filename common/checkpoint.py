"""Checkpoints a killed run resumes from, bit for bit, and the --resume settings check.

runs/<run>/checkpoints/step-<k>/ holds the trained models (safetensors), the optimizer state, state.json (the
script, the step, the reference's path, the seconds trained, the method's running statistics, the data order)
and one rng-rank<r>.pt per process (python, numpy and torch generators, and the data-order generator).
runs/<run>/checkpoints/latest names the newest complete one. A save writes a new folder, then replaces
`latest` in one atomic rename, then deletes the older folder: a process killed at any moment leaves `latest`
naming a complete checkpoint, the previous one or the new one, never a mix.
"""

import dataclasses
import json
import os
import random
import shutil
import time

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_model, save_model

from .models import PAINTER

# settings that may change when a run is resumed: where and how often it logs, evaluates and saves
RESUMABLE = {
    "resume",
    "output_dir",
    "exp_name",
    "track",
    "wandb_project",
    "log_every",
    "eval_every",
    "save_every",
    "device",
}


def resumed_args(script: str, args):
    """--resume RUN_DIR: the run's own settings (args.json), with the flags given now where they differ from
    the defaults. A flag of the method itself (anything outside RESUMABLE) that differs is refused, with one
    line naming it; so is a folder of another script."""
    run_dir = args.resume.rstrip("/")
    path = os.path.join(run_dir, "args.json")
    if not os.path.isfile(path) or not os.path.isfile(os.path.join(run_dir, "checkpoints", "latest")):
        raise FileNotFoundError(
            f"--resume {run_dir!r} has no args.json and checkpoints/latest: pass the folder of "
            "a run that saved a checkpoint"
        )
    if not os.path.basename(run_dir).startswith(script + "__"):
        raise ValueError(
            f"--resume {run_dir!r} is not a {script}.py run: resume it with the script that made it"
        )
    saved, merged = json.load(open(path)), {}
    for field in dataclasses.fields(args):
        now, then = getattr(args, field.name), saved.get(field.name, field.default)
        if now != field.default and now != then and field.name not in RESUMABLE:
            flag = "--" + field.name.replace("_", "-")
            raise ValueError(
                f"--resume {run_dir!r}: the run was started with {flag} {then}, not {now}; resume "
                f"with the same settings (only {', '.join(sorted(RESUMABLE - {'resume'}))} may change)"
            )
        merged[field.name] = now if now != field.default else then  # what was not given now: the run's own
    return type(args)(**merged)


def rng_states(rng: np.random.Generator) -> dict:
    """Plain numbers, lists and tensors only, so that torch.load(weights_only=True) reads them back."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), position, has_gauss, gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "data": rng.bit_generator.state,
    }


def set_rng_states(states: dict, rng: np.random.Generator) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    rng.bit_generator.state = states["data"]


def save_checkpoint(log, step: int, models: dict, optimizer, rng: np.random.Generator, **state) -> None:
    """Every rank: its random states; rank 0: the models, the optimizer and `state` (the method's running
    statistics, JSON-able). Then `latest` moves to this step. All ranks must call it at the same step.
    Like the evals, its time is left out of perf/train_s."""
    t_save = time.perf_counter()
    folder = os.path.join(log.dir, "checkpoints")
    final, tmp = os.path.join(folder, f"step-{step}"), os.path.join(folder, f"step-{step}.tmp")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    if dist.is_initialized():
        dist.barrier()
    torch.save(rng_states(rng), os.path.join(tmp, f"rng-rank{rank}.pt"))
    if rank == 0:
        for name, model in models.items():
            save_model(model, os.path.join(tmp, f"{name}.safetensors"))
        torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        meta = {
            "script": log.script,
            "step": step,
            "reference": log.reference,
            "train_s": log.train_seconds(),
            "world": dist.get_world_size() if dist.is_initialized() else 1,
            "state": state,
        }
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump(meta, f)
    if dist.is_initialized():
        dist.barrier()  # every rank's file is in place
    if rank == 0:
        for name in os.listdir(tmp):  # to disk before the rename makes the folder the newest checkpoint
            with open(os.path.join(tmp, name), "rb") as f:
                os.fsync(f.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        with open(os.path.join(folder, "latest.tmp"), "w") as f:
            f.write(f"step-{step}")
            f.flush()
            os.fsync(f.fileno())
        os.replace(os.path.join(folder, "latest.tmp"), os.path.join(folder, "latest"))  # the atomic switch
        for name in os.listdir(folder):
            if name.startswith("step-") and name != f"step-{step}":
                shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
    log.eval_s += time.perf_counter() - t_save


def load_checkpoint(log, models: dict, optimizer, rng: np.random.Generator) -> tuple[int, dict]:
    """Load the newest complete checkpoint of log.dir into models, optimizer and the random generators (this
    rank's); returns the step to continue from and the method's saved state."""
    folder = os.path.join(log.dir, "checkpoints")
    with open(os.path.join(folder, "latest")) as f:
        path = os.path.join(folder, f.read().strip())
    with open(os.path.join(path, "state.json")) as f:
        meta = json.load(f)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if meta["world"] != world:
        raise ValueError(
            f"--resume {log.dir!r}: its checkpoint was saved by {meta['world']} processes, not {world}: "
            "resume with the same number of processes (each one's random state is saved)"
        )
    for name, model in models.items():
        load_model(
            model, os.path.join(path, f"{name}.safetensors"), device=str(next(model.parameters()).device)
        )
    optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), weights_only=True))
    rank = dist.get_rank() if dist.is_initialized() else 0
    set_rng_states(torch.load(os.path.join(path, f"rng-rank{rank}.pt"), weights_only=True), rng)
    log.resumed(meta["step"], meta["train_s"])
    return meta["step"] + 1, meta["state"]


def reference_path(model: str | None) -> str:
    """The frozen reference of a run is always its starting model, never a checkpoint."""
    return model or PAINTER
