"""--resume: a run continued from its newest checkpoint (common/run.py saves them), with its own settings."""

import dataclasses
import json
import os
import random
import time

import numpy as np
import torch
from safetensors.torch import load_model

# what may change when a run is resumed: where and how often it logs, evaluates and saves
RESUMABLE = {"resume", "output_dir", "exp_name", "track", "wandb_project", "log_every", "eval_every",
             "save_every", "device"}  # fmt: skip

def resumed_args(script: str, args):
    """--resume RUN_DIR: the run's own settings (args.json), with the flags given now where they differ from
    the defaults; a method flag (outside RESUMABLE) that differs, or another script's folder, is refused."""
    run_dir = args.resume.rstrip("/")
    if not all(os.path.isfile(os.path.join(run_dir, f)) for f in ("args.json", "checkpoints/latest")):
        raise FileNotFoundError(f"--resume {run_dir!r} has no args.json and checkpoints/latest: pass the "
                                "folder of a run that saved a checkpoint")  # fmt: skip
    if not os.path.basename(run_dir).startswith(script + "__"):
        raise ValueError(f"--resume {run_dir!r} is not a {script}.py run: resume it with the script that "
                         "made it")  # fmt: skip
    with open(os.path.join(run_dir, "args.json")) as f:
        saved, merged = json.load(f), {}
    for field in dataclasses.fields(args):
        now, then = getattr(args, field.name), saved.get(field.name, field.default)
        if now != field.default and now != then and field.name not in RESUMABLE:
            flag = "--" + field.name.replace("_", "-")
            raise ValueError(f"--resume {run_dir!r}: the run was started with {flag} {then}, not {now}; "
                             "resume with the same settings (only "
                             f"{', '.join(sorted(RESUMABLE - {'resume'}))} may change)")  # fmt: skip
        merged[field.name] = now if now != field.default else then  # what was not given now: the run's own
    return type(args)(**merged)


def drop_rows_after(path: str, step: int) -> None:
    """The rows of a JSONL log up to `step`: a run killed after its checkpoint may have logged later steps
    (and half a line), which the resumed run logs again. The eval of the checkpoint's step stays: it is logged
    before the checkpoint is saved. Rewritten atomically: a kill now leaves the file as it was."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        kept = [line for line in f if line.endswith("\n") and json.loads(line)["step"] <= step]
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


def load_checkpoint(run, models: dict, optimizer) -> tuple[int, dict]:
    """The newest checkpoint of run.dir into models, optimizer and this rank's random generators; returns the
    step to continue from and the method's saved state."""
    with open(f"{run.dir}/checkpoints/latest") as f:
        folder = os.path.join(run.dir, "checkpoints", f.read().strip())
    with open(os.path.join(folder, "state.json")) as f:
        meta = json.load(f)
    if meta["world"] != run.world:
        raise ValueError(f"--resume {run.dir!r}: its checkpoint was saved by {meta['world']} processes, not "
                         f"{run.world}: resume with as many (each one's random state is saved)")
    if run.args.fsdp:  # every rank its shards of the models and the optimizer
        from .fsdp import load_sharded

        load_sharded(models, optimizer, folder)
    for name, model in models.items() if not run.args.fsdp else ():  # LoRA: what trains (strict=False)
        device = str(next(model.parameters()).device)
        load_model(model, f"{folder}/{name}.safetensors", strict=not run.args.lora_rank, device=device)
    # NOTE: what the saver had on a GPU loads onto this process's (not onto cuda:0 on every rank, and a CUDA
    # run resumes on a CPU); what it had on the CPU stays there, as a non-fused Adam keeps its `step` on the
    # CPU (load_state_dict moves the rest, and a fused Adam's step, to the parameters)
    device = optimizer.param_groups[0]["params"][0].device
    on_device = lambda storage, saved_on: storage if saved_on == "cpu" else storage.to(device=device)
    if not run.args.fsdp:
        saved = torch.load(f"{folder}/optimizer.pt", map_location=on_device, weights_only=True)
        optimizer.load_state_dict(saved)
    states = torch.load(f"{folder}/rng-rank{run.rank}.pt", weights_only=True)
    random.setstate((states["python"][0], tuple(states["python"][1]), states["python"][2]))
    kind, keys, *rest = states["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    run.rng.bit_generator.state = states["data"]
    run.t_start -= meta["train_s"] - (time.perf_counter() - run.t_start - run.eval_s)  # perf/train_s goes on
    if run.active:
        for name in ("metrics.jsonl", "samples.jsonl"):
            drop_rows_after(os.path.join(run.dir, name), meta["step"])
        print(f"resumed from step {meta['step']} of {run.dir}", flush=True)
    return meta["step"] + 1, meta["state"]

