"""The run: everything a training script does that is not its method, behind one small object.

    run = Run("grpo", args)     # --resume's settings, the process group, seeds, the run folder and the logger
    start, state = run.begin({"model": model}, optimizer, tokenizer, run_eval)   # resume, or eval step 0
    ... run.end_step(step, total_steps, metrics, **state)   # log, evaluate and save, checkpoint on schedule
    return run.close()          # the closing line, leave the process group; the last eval's metrics

runs/<script>__<exp_name>__<seed>__<unix time>/ holds args.json, metrics.jsonl (one object per log step and
eval), samples.jsonl (the eval's generations), model/ (saved at every eval, atomically) and checkpoints/.
A checkpoint, checkpoints/step-<k>/, holds the trained models (safetensors), the optimizer, state.json (the
step, the seconds trained, the method's running statistics) and one rng-rank<r>.pt per process;
checkpoints/latest names the newest complete one, replaced by one atomic rename, so a process killed at any
moment leaves a complete checkpoint. Only rank 0 writes or prints.
"""

import atexit
import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_model, save_model
from torch.nn.parallel import DistributedDataParallel

from .models import PAINTER, autocast, resolve_device_dtype, save_atomic

# settings that may change when a run is resumed: where and how often it logs, evaluates and saves
RESUMABLE = {"resume", "output_dir", "exp_name", "track", "wandb_project", "log_every", "eval_every", "save_every",
             "device"}  # fmt: skip
CONSOLE = {"train/reward": "reward", "rewards/margins": "margin", "train/accuracy": "accuracy", "train/kl": "kl",
           "train/loss": "loss", "eval/reward": "reward", "eval/accuracy": "accuracy", "eval/correct": "correct",
           "eval/distinct": "distinct"}  # fmt: skip


def one_line_errors(script: str) -> None:
    """Bad input (ValueError, OSError, FloatingPointError, raised at start-up, in the loaders or by a NaN) ends
    a script with one line naming the problem, not a traceback."""
    default_hook = sys.excepthook

    def one_line(kind, error, traceback):
        if issubclass(kind, (ValueError, OSError, FloatingPointError)):
            print(f"{script}.py: error: {error}", file=sys.stderr)
        else:
            default_hook(kind, error, traceback)

    sys.excepthook = one_line


def resumed_args(script: str, args):
    """--resume RUN_DIR: the run's own settings (args.json), with the flags given now where they differ from
    the defaults; a method flag (outside RESUMABLE) that differs, or another script's folder, is refused."""
    run_dir = args.resume.rstrip("/")
    if not all(os.path.isfile(os.path.join(run_dir, f)) for f in ("args.json", "checkpoints/latest")):
        raise FileNotFoundError(f"--resume {run_dir!r} has no args.json and checkpoints/latest: pass the folder "
                                "of a run that saved a checkpoint")  # fmt: skip
    if not os.path.basename(run_dir).startswith(script + "__"):
        raise ValueError(f"--resume {run_dir!r} is not a {script}.py run: resume it with the script that made it")
    saved, merged = json.load(open(os.path.join(run_dir, "args.json"))), {}
    for field in dataclasses.fields(args):
        now, then = getattr(args, field.name), saved.get(field.name, field.default)
        if now != field.default and now != then and field.name not in RESUMABLE:
            raise ValueError(f"--resume {run_dir!r}: the run was started with --{field.name.replace('_', '-')} "
                             f"{then}, not {now}; resume with the same settings (only "
                             f"{', '.join(sorted(RESUMABLE - {'resume'}))} may change)")  # fmt: skip
        merged[field.name] = now if now != field.default else then  # what was not given now: the run's own
    return type(args)(**merged)


class Run:
    """One training run's plumbing. rank, world: this process and how many (torchrun; 1 under plain python);
    device, dtype: where and in what the forward computes; rng: the data-order generator, the same on every
    rank; dir: the run folder; active: whether this process writes (rank 0)."""

    def __init__(self, script: str, args, seed_per_rank: bool = False):
        one_line_errors(script)
        self.args = args = resumed_args(script, args) if args.resume else args
        self.rank, self.world = 0, 1
        if "WORLD_SIZE" in os.environ:  # torchrun: NCCL between GPUs, gloo between CPU processes
            on_cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
            if on_cuda:  # "cuda" then means this rank's GPU
                torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
            dist.init_process_group("nccl" if on_cuda else "gloo")
            # NOTE: left at exit, after main has freed its DDP wrappers: a reducer that holds the gloo group
            # last destroys it while holding the GIL, which can deadlock against gloo's worker thread
            atexit.register(dist.destroy_process_group)
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device, self.dtype = resolve_device_dtype(args.device, args.dtype)
        self.script, self.reference, self.active = script, getattr(args, "model", None) or PAINTER, self.rank == 0
        random.seed(args.seed)
        np.random.seed(args.seed)
        # seed_per_rank: each rank samples its own completions; seed + 100_003 * rank never repeats another
        # (seed, rank)'s stream below 100,003 seeds (with seed + rank, seed 2 on rank 0 would be seed 1 on rank 1)
        torch.manual_seed(args.seed + 100_003 * self.rank * seed_per_rank)
        self.rng = np.random.default_rng(args.seed)
        self.t_start, self.eval_s, self.evals, self.wandb, self.tensorboard = time.perf_counter(), 0.0, [], None, None
        self.dir = args.resume.rstrip("/") if args.resume else os.path.join(
            args.output_dir, f"{script}__{args.exp_name}__{args.seed}__{int(time.time())}")  # fmt: skip
        if self.world > 1:  # NOTE: rank 0's folder for all: the ranks' clocks can straddle a second
            shared = [self.dir]
            dist.broadcast_object_list(shared, src=0)
            self.dir = shared[0]
        if not self.active:
            return
        os.makedirs(self.dir, exist_ok=True)
        if args.resume:  # the first eval, for the closing line
            with open(os.path.join(self.dir, "metrics.jsonl")) as f:
                self.evals = [row for row in map(json.loads, f) if "perf/train_s" in row][:1]
        else:
            with open(os.path.join(self.dir, "args.json"), "w") as f:
                json.dump(dataclasses.asdict(args), f, indent=1)
        changed = [f"--{f.name.replace('_', '-')} {getattr(args, f.name)}" for f in dataclasses.fields(args)
                   if getattr(args, f.name) != f.default and f.name != "output_dir"]  # fmt: skip
        print(f"{script}.py {' '.join(changed) or '(all defaults)'} -> {self.dir}", flush=True)
        if args.track:
            import wandb

            config = dataclasses.asdict(args)
            self.wandb = wandb.init(project=args.wandb_project, name=os.path.basename(self.dir), config=config)
        with contextlib.suppress(ImportError):
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(os.path.join(self.dir, "tensorboard"))

    # ---- the process group ----

    def autocast(self):
        """The forward in `dtype` (bf16 on a GPU) under autocast; a no-op in fp32 (common.models.autocast)."""
        return autocast(self.device, self.dtype)

    def wrap(self, model):
        """DDP: a wrapper that averages the gradients over the ranks in backward; the model itself alone."""
        return DistributedDataParallel(model) if self.world > 1 else model

    def sync_gradients(self, ddp_model, sync: bool):
        """DDP all-reduces the gradients in every backward; with micro-batches, once is enough: in the last."""
        return contextlib.nullcontext() if sync or self.world == 1 else ddp_model.no_sync()

    def all_sum(self, x: torch.Tensor) -> torch.Tensor:
        """x summed over the ranks; x itself in a world of one."""
        if self.world == 1:
            return x
        y = x.detach().to("cuda" if dist.get_backend() == "nccl" else "cpu").clone()
        dist.all_reduce(y)
        return y.to(x.device)

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """The ranks' x concatenated along dim 0 in rank order; x itself in a world of one."""
        if self.world == 1:
            return x
        y = x.detach().to("cuda" if dist.get_backend() == "nccl" else "cpu").contiguous()
        parts = [torch.empty_like(y) for _ in range(self.world)]
        dist.all_gather(parts, y)
        return torch.cat(parts).to(x.device)

    # ---- the run's course: begin, each step's end, close ----

    def begin(self, models: dict, optimizer, tokenizer, run_eval) -> tuple[int, dict]:
        """--resume: load the newest checkpoint (weights, optimizer, random states); else evaluate the starting
        model (step 0). models: what a checkpoint saves, "model" the one evaluated and saved; run_eval() ->
        (metrics, samples or None). Returns the first step to run and the method's saved state."""
        self.models, self.optimizer, self.tokenizer, self.run_eval = models, optimizer, tokenizer, run_eval
        if not self.args.resume:
            self.evaluate(0)
            return 1, {}
        folder = os.path.join(self.dir, "checkpoints")
        path = os.path.join(folder, open(os.path.join(folder, "latest")).read().strip())
        meta = json.load(open(os.path.join(path, "state.json")))
        if meta["world"] != self.world:
            raise ValueError(f"--resume {self.dir!r}: its checkpoint was saved by {meta['world']} processes, not "
                             f"{self.world}: resume with as many (each one's random state is saved)")  # fmt: skip
        for name, model in models.items():
            load_model(model, os.path.join(path, f"{name}.safetensors"), device=str(next(model.parameters()).device))
        optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), weights_only=True))
        states = torch.load(os.path.join(path, f"rng-rank{self.rank}.pt"), weights_only=True)
        version, internal, gauss = states["python"]
        random.setstate((version, tuple(internal), gauss))
        kind, keys, position, has_gauss, gauss = states["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, gauss))
        torch.set_rng_state(states["torch"])
        if states["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["cuda"])
        self.rng.bit_generator.state = states["data"]
        self.t_start -= meta["train_s"] - (time.perf_counter() - self.t_start - self.eval_s)  # perf/train_s goes on
        if self.active:
            print(f"resumed from step {meta['step']} of {self.dir}", flush=True)
        return meta["step"] + 1, meta["state"]

    def end_step(self, step: int, total_steps: int, metrics: dict | None = None, **state) -> None:
        """Log the step's metrics (when given; averaged over the ranks, perf/tokens_per_s summed), then evaluate and save the
        model every --eval-every steps and after the last, and save a checkpoint every --save-every steps
        (default: at each eval) with `state`, the method's running statistics (JSON-able)."""
        if metrics is not None:  # DDP: the mean over the ranks (each a mean over its share); a throughput, the sum
            names = [k for k, v in metrics.items() if isinstance(v, (float, torch.Tensor))]  # not the epoch
            sums = self.all_sum(torch.tensor([float(metrics[k]) for k in names], dtype=torch.float64)).tolist()
            metrics.update({k: v if k == "perf/tokens_per_s" else v / self.world for k, v in zip(names, sums)})
            self.log(step, metrics)
        if step % self.args.eval_every == 0 or step == total_steps:
            self.evaluate(step)
        if step % (self.args.save_every or self.args.eval_every) == 0 or step == total_steps:
            self.save_checkpoint(step, state)

    def check_finite(self, value: torch.Tensor, step: int, what: str, advice: str = "lower --learning-rate"):
        """Stop with one line when a loss or gradient is NaN or inf; the last good model stays saved."""
        if not torch.isfinite(value).all():
            raise FloatingPointError(f"{what} is {float(value.flatten()[0])} at step {step}; the last good model "
                                     f"is in {self.dir}/model: {advice}")  # fmt: skip

    def close(self) -> dict:
        """Wait for rank 0's last eval and save; the closing line (where the run went, the eval's headline
        metric before -> after). Returns the last eval's metrics and the run folder."""
        if self.world > 1:
            dist.barrier()
        if self.active:
            first, last = (self.evals or [{}])[0], (self.evals or [{}])[-1]
            key = next((k for k in ("eval/reward", "eval/accuracy") if k in first), None)
            trend = f" | {key} {first[key]:.4g} -> {last[key]:.4g}" if key else ""
            print(f"done in {time.perf_counter() - self.t_start:.0f} s: {self.dir}{trend}", flush=True)
            for writer in (self.wandb, self.tensorboard):
                if writer is not None:
                    writer.finish() if writer is self.wandb else writer.close()
        return {**(self.evals[-1] if self.active and self.evals else {}), "run_dir": self.dir}

    # ---- the log, the eval and the checkpoints ----

    def log(self, step: int, metrics: dict, samples: list[dict] | None = None, kind: str = "step") -> None:
        """Append {"step": step, **metrics} to metrics.jsonl (and samples to samples.jsonl); a console line."""
        if not self.active:
            return
        with open(os.path.join(self.dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if samples:
            with open(os.path.join(self.dir, "samples.jsonl"), "a") as f:
                f.writelines(json.dumps({"step": step, **s}) + "\n" for s in samples)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        for name, value in metrics.items() if self.tensorboard is not None else ():
            self.tensorboard.add_scalar(name, value, step)
        shown = [f"{name} {metrics[k]:.4g}" for k, name in CONSOLE.items() if math.isfinite(metrics.get(k, math.nan))]
        shown += [f"{metrics['perf/step_s']:.2f} s/step"] if "perf/step_s" in metrics else []
        print(f"{kind} {step} | " + " | ".join(shown[:6]), flush=True)

    def evaluate(self, step: int) -> None:
        """Rank 0: run_eval(), logged with perf/train_s (wall clock, evals and saves left out), a few samples
        printed, and the model saved: the last good one."""
        if not self.active:
            return
        t_eval = time.perf_counter()
        metrics, samples = self.run_eval()
        metrics = {**metrics, "perf/train_s": t_eval - self.t_start - self.eval_s}
        self.log(step, metrics, samples, kind="eval")
        if samples:
            print("   " + " · ".join(f"{s['prompt'][-7:]} → {s['completion']}" for s in samples[:6]), flush=True)
        save_atomic(self.models["model"], self.tokenizer, os.path.join(self.dir, "model"))
        self.eval_s += time.perf_counter() - t_eval
        self.evals.append(metrics)

    def save_checkpoint(self, step: int, state: dict) -> None:
        """Every rank: its random states; rank 0: the models, the optimizer and state.json. Then `latest` moves
        to this step. Like the evals, its time is left out of perf/train_s."""
        t_save, folder = time.perf_counter(), os.path.join(self.dir, "checkpoints")
        final, tmp = os.path.join(folder, f"step-{step}"), os.path.join(folder, f"step-{step}.tmp")
        if self.active:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        if self.world > 1:
            dist.barrier()
        kind, keys, position, has_gauss, gauss = np.random.get_state()
        rng_states = {  # plain numbers, lists and tensors only, which torch.load(weights_only=True) reads
            "python": random.getstate(), "numpy": [kind, keys.tolist(), position, has_gauss, gauss],
            "torch": torch.get_rng_state(), "data": self.rng.bit_generator.state,
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }  # fmt: skip
        torch.save(rng_states, os.path.join(tmp, f"rng-rank{self.rank}.pt"))
        if self.active:
            for name, model in self.models.items():
                save_model(model, os.path.join(tmp, f"{name}.safetensors"))
            torch.save(self.optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
            train_s = time.perf_counter() - self.t_start - self.eval_s
            meta = dict(script=self.script, step=step, reference=self.reference, train_s=train_s, world=self.world,
                        state=state)  # fmt: skip
            with open(os.path.join(tmp, "state.json"), "w") as f:
                json.dump(meta, f, default=lambda array: array.tolist())  # numpy arrays and numbers as lists
        if self.world > 1:
            dist.barrier()  # every rank's file is in place
        if self.active:
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
        self.eval_s += time.perf_counter() - t_save
