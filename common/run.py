"""The plumbing of a training run, none of it the method: the process group under torchrun, the command line
with one-line errors, and the run folder with its logs, console lines and checkpoints."""

import contextlib
import dataclasses
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import tyro

from .models import PAINTER, save_atomic

# ---- the process group (torchrun starts one process per rank; plain python is a world of one) -----------


def init_distributed(device: str) -> tuple[int, int]:
    """Join torchrun's process group (NCCL between GPUs, gloo between CPU processes) and return (rank, world
    size); (0, 1) under plain python. Under NCCL, "cuda" then means this rank's GPU, LOCAL_RANK."""
    if "WORLD_SIZE" not in os.environ:
        return 0, 1
    on_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if on_cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if on_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


def sampling_seed(seed: int, rank: int) -> int:
    """The torch seed of one rank: seed + 100_003 * rank, so that no (seed, rank) repeats another's random
    stream below 100,003 seeds (with seed + rank, seed 2 on rank 0 would sample what seed 1 samples on
    rank 1)."""
    return seed + 100_003 * rank


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """x summed over the ranks; x itself in a world of one."""
    if not dist.is_initialized():
        return x
    y = x.detach().to("cuda" if dist.get_backend() == "nccl" else "cpu").clone()
    dist.all_reduce(y)
    return y.to(x.device)


def all_gather(x: torch.Tensor) -> torch.Tensor:
    """The ranks' x concatenated along dim 0 in rank order; x itself in a world of one."""
    if not dist.is_initialized():
        return x
    y = x.detach().to("cuda" if dist.get_backend() == "nccl" else "cpu").contiguous()
    parts = [torch.empty_like(y) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, y)
    return torch.cat(parts).to(x.device)


def sync_gradients(ddp_model, sync: bool):
    """DDP all-reduces the gradients in every backward; with micro-batches, once is enough: in the last
    one."""
    return contextlib.nullcontext() if sync or not dist.is_initialized() else ddp_model.no_sync()


def cleanup_distributed() -> None:
    """Wait for rank 0's last eval and save, then leave the group together.
    NOTE: free the DDP wrappers before calling this (`del ddp_model`): a reducer that holds the gloo group
    last destroys it while holding the GIL, which can deadlock against gloo's worker thread."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ---- the command line ---------------------------------------------------------------------------------


def parse_args(args_class, doc: str):
    """tyro's CLI for the Args dataclass (one flag per field, its docstring as help); bad input (ValueError,
    OSError, FloatingPointError, raised at start-up or in common's loaders) then ends the script with one line
    naming the problem, not a traceback."""
    script = os.path.basename(sys.argv[0])
    default_hook = sys.excepthook

    def one_line(kind, error, traceback):
        if issubclass(kind, (ValueError, OSError, FloatingPointError)):
            print(f"{script}: error: {error}", file=sys.stderr)
        else:
            default_hook(kind, error, traceback)

    sys.excepthook = one_line
    return tyro.cli(args_class, description=doc)


# ---- the run folder, the logs and the console ---------------------------------------------------------

CONSOLE = {
    "train/reward": "reward",
    "rewards/margins": "margin",
    "train/accuracy": "accuracy",
    "train/kl": "kl",
    "train/loss": "loss",
    "eval/reward": "reward",
    "eval/accuracy": "accuracy",
    "eval/correct": "correct",
    "eval/distinct": "distinct",
}


class Logger:
    """runs/<script>__<exp_name>__<seed>__<unix time>/ holds args.json, metrics.jsonl (one object per log
    step and eval), samples.jsonl (the eval's generations) and model/ (saved at every eval, atomically).
    The console gets the flags that differ from the defaults, one short line per log step and eval, and
    where the run went. --track also logs to Weights & Biases; TensorBoard gets the same scalars when it is
    installed. Only rank 0 writes or prints: on the other ranks every method does nothing."""

    def __init__(self, script: str, args, rank: int = 0):
        # perf/train_s: wall clock with the evals left out
        self.t_start, self.eval_s = time.perf_counter(), 0.0
        self.script, self.reference = script, getattr(args, "model", None) or PAINTER  # the starting model
        self.dir = os.path.join(
            args.output_dir, f"{script}__{args.exp_name}__{args.seed}__{int(time.time())}"
        )
        if getattr(args, "resume", None):  # a resumed run continues in its own folder, appending
            self.dir = args.resume.rstrip("/")
        if dist.is_initialized():  # NOTE: rank 0's folder for all: the ranks' clocks can straddle a second
            shared = [self.dir]
            dist.broadcast_object_list(shared, src=0)
            self.dir = shared[0]
        self.active, self.evals, self.wandb, self.tensorboard = rank == 0, [], None, None
        if not self.active:
            return
        os.makedirs(self.dir, exist_ok=True)
        if getattr(args, "resume", None):
            with open(os.path.join(self.dir, "metrics.jsonl")) as f:  # the first eval, for the closing line
                self.evals = [row for row in map(json.loads, f) if "perf/train_s" in row][:1]
        else:
            with open(os.path.join(self.dir, "args.json"), "w") as f:
                json.dump(dataclasses.asdict(args), f, indent=1)
        changed = [
            f"--{field.name.replace('_', '-')} {getattr(args, field.name)}"
            for field in dataclasses.fields(args)
            if getattr(args, field.name) != field.default and field.name != "output_dir"
        ]
        print(f"{script}.py {' '.join(changed) or '(all defaults)'} -> {self.dir}", flush=True)
        if getattr(args, "track", False):
            import wandb

            self.wandb = wandb.init(
                project=args.wandb_project, name=os.path.basename(self.dir), config=dataclasses.asdict(args)
            )
        with contextlib.suppress(ImportError):
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(os.path.join(self.dir, "tensorboard"))

    def log(self, step: int, metrics: dict, samples: list[dict] | None = None, kind: str = "step") -> None:
        """Append {"step": step, **metrics} to metrics.jsonl (and samples to samples.jsonl); one console
        line."""
        if not self.active:
            return
        with open(os.path.join(self.dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if samples:
            with open(os.path.join(self.dir, "samples.jsonl"), "a") as f:
                f.writelines(json.dumps({"step": step, **s}) + "\n" for s in samples)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if self.tensorboard is not None:
            for name, value in metrics.items():
                self.tensorboard.add_scalar(name, value, step)
        shown = [
            f"{name} {metrics[k]:.4g}"
            for k, name in CONSOLE.items()
            if k in metrics and math.isfinite(metrics[k])
        ]
        if "perf/step_s" in metrics:
            shown.append(f"{metrics['perf/step_s']:.2f} s/step")
        print(f"{kind} {step} | " + " | ".join(shown[:6]), flush=True)

    def evaluate(self, step: int, run_eval, model=None, tokenizer=None) -> dict:
        """Rank 0: run_eval() -> (metrics, samples or None); log them, print a few samples, and save the
        model, the last good checkpoint. perf/train_s, logged with the eval, leaves the evals' own time
        out."""
        if not self.active:
            return {}
        t_eval = time.perf_counter()
        metrics, samples = run_eval()
        metrics = {**metrics, "perf/train_s": t_eval - self.t_start - self.eval_s}  # = train_seconds()
        self.log(step, metrics, samples, kind="eval")
        if samples:
            print(
                "   " + " · ".join(f"{s['prompt'][-7:]} → {s['completion']}" for s in samples[:6]),
                flush=True,
            )
        if model is not None:
            save_atomic(model, tokenizer, os.path.join(self.dir, "model"))
        self.eval_s += time.perf_counter() - t_eval
        self.evals.append(metrics)
        return metrics

    def train_seconds(self) -> float:
        """Wall-clock seconds of this run so far, evals left out (perf/train_s)."""
        return time.perf_counter() - self.t_start - self.eval_s

    def resumed(self, step: int, train_s: float) -> None:
        """Continue perf/train_s from where the checkpoint left it."""
        self.t_start -= train_s - self.train_seconds()
        if self.active:
            print(f"resumed from step {step} of {self.dir}", flush=True)

    def close(self) -> None:
        """The closing line: where the run went, and the eval's headline metric before -> after."""
        if not self.active:
            return
        key = next((k for k in ("eval/reward", "eval/accuracy") if self.evals and k in self.evals[0]), None)
        trend = f" | {key} {self.evals[0][key]:.4g} -> {self.evals[-1][key]:.4g}" if key else ""
        print(f"done in {time.perf_counter() - self.t_start:.0f} s: {self.dir}{trend}", flush=True)
        if self.wandb is not None:
            self.wandb.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()
