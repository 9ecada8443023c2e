"""The run: what a training script does that is not its method, behind one small object.

    run = Run("grpo", args)   # --resume's settings, the process group, seeds, the run folder, the log
    start, state = run.begin({"model": model}, optimizer, tokenizer, run_eval)  # resume, or eval step 0
    run.end_step(step, total_steps, metrics, **state)  # log; evaluate, save, checkpoint on schedule
    return run.close()        # the closing line; the last eval's metrics and the run folder

runs/<script>__<exp_name>__<seed>__<time>/ gets args.json, metrics.jsonl, samples.jsonl, model/ (each eval's)
and checkpoints/step-<k>/ (models, optimizer, state.json, each rank's random states; checkpoints/latest moves
by an atomic rename: a run killed at any moment resumes from a whole one). Only rank 0 writes or prints."""

import atexit
import collections
import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file, save_model
from torch.nn.parallel import DistributedDataParallel

from .models import PAINTER, autocast, resolve_device_dtype, save_atomic

CONSOLE = {"train/reward": "reward", "rewards/margins": "margin", "train/accuracy": "accuracy",
           "train/kl": "kl", "train/loss": "loss", "eval/reward": "reward", "eval/accuracy": "accuracy",
           "eval/correct": "correct", "eval/distinct": "distinct"}  # fmt: skip


def one_line_errors(script: str) -> None:
    """Bad input (ValueError, OSError, FloatingPointError, ImportError: at start-up, in the loaders, a NaN,
    a package a flag needs) ends the script with one line naming the problem, not a traceback."""
    default_hook = sys.excepthook

    def one_line(kind, error, traceback):
        if not issubclass(kind, (ValueError, OSError, FloatingPointError, ImportError)):
            return default_hook(kind, error, traceback)
        print(f"{script}.py: error: {error}", file=sys.stderr)

    sys.excepthook = one_line


class Run:
    """rank, world: this process and how many (torchrun; 1 under python); device, dtype: where and in what the
    forward computes; rng: the data order, the same on every rank; dir: the run folder; active: rank 0;
    base: the model trained from (--model or the painter); load_device: where models load (FSDP: the host)."""

    @dataclasses.dataclass
    class Args:
        """The run's settings that are not its method's, shared by the six scripts: `class Args(Run.Args)`."""

        exp_name: str = "default"
        """name of this experiment (part of the run folder's name)"""
        output_dir: str = "runs"
        """runs go to output_dir/<script>__<exp_name>__<seed>__<time>/"""
        resume: Optional[str] = None
        """a run folder to continue from its last checkpoint, in the same folder, with the same settings"""
        save_every: Optional[int] = None
        """save a checkpoint (weights, optimizer, step, random states) every N steps; None = at each eval"""
        track: bool = False
        """log to Weights & Biases (needs `pip install wandb`)"""
        wandb_project: str = "paint-post-training"
        """the W&B project of --track"""
        device: str = "auto"
        """cuda if present, else cpu"""
        dtype: str = "auto"
        """compute dtype: bfloat16 autocast on cuda, float32 on cpu (trained weights, Adam state: float32)"""
        gradient_checkpointing: bool = False
        """recompute each layer's activations in backward, not keeping them: less memory, ~30% more time"""
        lora_rank: int = 0
        """LoRA: train rank-R adapters on the frozen model (PEFT), 0 = every weight; the reference is the
        model with its adapters off (no copy); the default learning rate is 10x full fine-tuning's"""
        lora_alpha: Optional[float] = None
        """LoRA: the adapters' output is scaled by alpha / R; None = 2 R"""
        lora_target_modules: str = "all-linear"
        """LoRA: the linear layers that get adapters: all but the output layer, or names, comma-separated"""
        lora_merge: bool = False
        """LoRA: save model/ as a plain model with the adapters merged in, not as PEFT's adapter folder"""
        fsdp: bool = False
        """under torchrun: shard weights, gradients and Adam state over the processes (FSDP2, fully_shard)"""

    def __init__(self, script: str, args, seed_per_rank: bool = False, learning_rate=(None, None)):
        one_line_errors(script)
        if args.resume:  # the run's own settings (common/resume.py, which a copy may leave out)
            from .resume import resumed_args

            args = resumed_args(script, args)
        if getattr(args, "learning_rate", 0) is None:  # not given: learning_rate = (the painter's, another's)
            painter = args.model is None or os.path.realpath(args.model) == os.path.realpath(PAINTER)
            lr = learning_rate[0] if painter else learning_rate[1]
            lr = lr * 10 if args.lora_rank and lr else lr  # NOTE: LoRA: 10x full fine-tuning's (TRL's docs)
            args = dataclasses.replace(args, learning_rate=lr)
        self.args = args
        self.rank, self.world = 0, 1
        if "WORLD_SIZE" in os.environ:  # torchrun: NCCL between GPUs (this rank's), gloo between CPUs
            on_cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
            if on_cuda:
                torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
            dist.init_process_group("nccl" if on_cuda else "gloo")
            # NOTE: left at exit, once main has freed its DDP wrappers: a reducer that holds the gloo group
            # last destroys it while holding the GIL, which can deadlock against gloo's worker thread
            atexit.register(dist.destroy_process_group)
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device, self.dtype = resolve_device_dtype(args.device, args.dtype)
        self.load_device = "cpu" if args.fsdp else str(self.device)  # FSDP: fully_shard moves shards
        if args.fsdp and (self.world == 1 or args.lora_rank):
            raise ValueError("--fsdp shards over torchrun's processes: torchrun --nproc_per_node K "
                             f"{script}.py --fsdp" if self.world == 1 else "--fsdp and --lora-rank are not "
                             "combined here: LoRA's trained state is already small and its frozen base is "
                             "not sharded; use one (--fsdp to train every weight)")  # fmt: skip
        self.script, self.base, self.active = script, args.model or PAINTER, self.rank == 0
        random.seed(args.seed)
        np.random.seed(args.seed)
        # seed_per_rank: each rank samples its own completions; seed + 100_003 * rank repeats no other (seed,
        # rank)'s stream below 100,003 seeds (with seed + rank, seed 2 on rank 0 would be seed 1 on rank 1)
        torch.manual_seed(args.seed + 100_003 * self.rank * seed_per_rank)
        self.rng = np.random.default_rng(args.seed)
        self.t_start, self.eval_s, self.evals, self.wandb = time.perf_counter(), 0.0, [], None
        shared = [args.resume.rstrip("/") if args.resume else os.path.join(
            args.output_dir, f"{script}__{args.exp_name}__{args.seed}__{int(time.time())}")]  # fmt: skip
        if self.world > 1:  # NOTE: rank 0's folder for all: the ranks' clocks can straddle a second
            dist.broadcast_object_list(shared, src=0)
        self.dir = shared[0]
        if not self.active:
            return
        os.makedirs(self.dir, exist_ok=True)
        if args.resume:  # the first eval, for the closing line
            with open(f"{self.dir}/metrics.jsonl") as f:
                self.evals = [row for row in map(json.loads, f) if "perf/train_s" in row][:1]
        else:
            with open(f"{self.dir}/args.json", "w") as f:
                json.dump(dataclasses.asdict(args), f, indent=1)
        changed = [f"--{f.name.replace('_', '-')} {getattr(args, f.name)}" for f in dataclasses.fields(args)
                   if getattr(args, f.name) != f.default and f.name != "output_dir"]  # fmt: skip
        print(f"{script}.py {' '.join(changed) or '(all defaults)'} -> {self.dir}", flush=True)
        if args.track:  # Weights & Biases
            import wandb

            config, name = dataclasses.asdict(args), os.path.basename(self.dir)
            self.wandb = wandb.init(project=args.wandb_project, name=name, config=config)

    def autocast(self):
        """The forward in `dtype` (bf16 on a GPU) under autocast; a no-op in fp32 (common.models.autocast)."""
        return autocast(self.device, self.dtype)

    def lora(self, model):
        """--lora-rank R: the model with rank-R adapters, its base frozen (common/lora.py); else itself."""
        if not self.args.lora_rank:
            return model
        from .lora import add_adapters

        return add_adapters(model, self.args, self.dtype)

    def reference(self, model, host: bool = False):
        """The frozen starting policy. LoRA: the model with its adapters off (no copy); FSDP: a copy, sharded
        as the policy will be; else an fp32 copy on the device, or with host=True (for eval/kl only) in rank
        0's host memory (None on other ranks, which do not evaluate)."""
        if self.args.lora_rank:
            from .lora import AdapterOff

            return AdapterOff(model)
        if self.args.fsdp:
            from .fsdp import shard

            return shard(copy.deepcopy(model).requires_grad_(False), self.dtype).eval()
        if host:
            return copy.deepcopy(model).to("cpu").eval().requires_grad_(False) if self.active else None
        return copy.deepcopy(model).eval().requires_grad_(False)

    def to_host(self, frozen):
        """A frozen copy moved to rank 0's host memory (None on other ranks); LoRA's and FSDP's stay."""
        if self.args.lora_rank or self.args.fsdp:
            return frozen
        return frozen.to("cpu") if self.active else None

    def wrap(self, model):
        """FSDP: the model sharded in place (common/fsdp.py); DDP: a wrapper that averages the gradients over
        the ranks in backward; alone, the model itself."""
        if self.args.fsdp:
            from .fsdp import shard

            return shard(model, self.dtype)
        return DistributedDataParallel(model) if self.world > 1 else model

    def sync_gradients(self, ddp_model, sync: bool):
        """DDP all-reduces (FSDP reduce-scatters) gradients in each backward; with micro-batches: the last."""
        if self.args.fsdp:
            ddp_model.set_requires_gradient_sync(sync)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if sync or self.world == 1 else ddp_model.no_sync()

    def all_sum(self, x: torch.Tensor) -> torch.Tensor:
        """x summed over the ranks; x itself in a world of one."""
        if self.world == 1:
            return x
        y = x.detach().to("cuda" if dist.get_backend() == "nccl" else "cpu", copy=True)
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

    def begin(self, models: dict, optimizer, tokenizer, run_eval) -> tuple[int, dict]:
        """--resume: the newest checkpoint; else the eval of step 0. models: what a checkpoint holds ("model",
        evaluated and saved); run_eval() -> (metrics, samples or None). Returns (first step, saved state)."""
        self.models, self.optimizer, self.tokenizer, self.run_eval = models, optimizer, tokenizer, run_eval
        if not self.args.resume:
            self.evaluate(0)
            return 1, {}
        from .resume import load_checkpoint  # continuing a run: common/resume.py

        return load_checkpoint(self, models, optimizer)

    def end_step(self, step: int, total_steps: int, metrics: dict | None = None, **state) -> None:
        """Log metrics when given (DDP: the ranks' mean; perf/tokens_per_s, their sum); evaluate and save the
        model every --eval-every steps and last, a checkpoint with `state` (JSON-able) every --save-every."""
        if metrics is not None:
            names = [k for k, v in metrics.items() if isinstance(v, (float, torch.Tensor))]  # not the epoch
            values = torch.tensor([float(metrics[k]) for k in names], dtype=torch.float64)
            for name, total in zip(names, self.all_sum(values).tolist()):
                metrics[name] = total if name == "perf/tokens_per_s" else total / self.world
            self.log(step, metrics)
        if step % self.args.eval_every == 0 or step == total_steps:
            self.evaluate(step)
        if step % (self.args.save_every or self.args.eval_every) == 0 or step == total_steps:
            self.save_checkpoint(step, state)

    def check_finite(self, value: torch.Tensor, step: int, what: str, advice: str = "lower --learning-rate"):
        """Stop with one line when a loss or gradient is NaN or inf; the last good model stays saved."""
        if not torch.isfinite(value).all():
            raise FloatingPointError(f"{what}: NaN or inf at step {step}; the last good model is in "
                                     f"{self.dir}/model: {advice}")  # fmt: skip

    def close(self) -> dict:
        """After rank 0's last eval and save, the closing line (the run folder, the eval's headline metric
        before -> after); returns the last eval's metrics and the run folder."""
        if self.world > 1:
            dist.barrier()
        if self.active:
            first, last = (self.evals or [{}])[0], (self.evals or [{}])[-1]
            key = next((k for k in ("eval/reward", "eval/accuracy") if k in first), None)
            trend = f" | {key} {first[key]:.4g} -> {last[key]:.4g}" if key else ""
            print(f"done in {time.perf_counter() - self.t_start:.0f} s: {self.dir}{trend}", flush=True)
            if self.wandb is not None:
                self.wandb.finish()
        return {**(self.evals[-1] if self.active and self.evals else {}), "run_dir": self.dir}

    def log(self, step: int, metrics: dict, samples: list[dict] | None = None, kind: str = "step") -> None:
        """{"step": step, **metrics} to metrics.jsonl (samples to samples.jsonl), wandb; one console line."""
        if not self.active:
            return
        with open(f"{self.dir}/metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if samples:
            with open(f"{self.dir}/samples.jsonl", "a") as f:
                f.writelines(json.dumps({"step": step, **sample}) + "\n" for sample in samples)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        known = [(name, metrics[k]) for k, name in CONSOLE.items() if math.isfinite(metrics.get(k, math.inf))]
        shown = [f"{name} {value:.4g}" for name, value in known]
        shown += [f"{metrics['perf/step_s']:.2f} s/step"] if "perf/step_s" in metrics else []
        print(f"{kind} {step} | " + " | ".join(shown[:6]), flush=True)

    def evaluate(self, step: int) -> None:
        """Rank 0: run_eval(), logged with perf/train_s (wall clock, evals and saves left out), a few samples
        printed, and the model saved: the last good one. FSDP: every rank runs the eval's forwards."""
        if not (self.active or self.args.fsdp):
            return
        t_eval, model, state = time.perf_counter(), self.models["model"], None
        metrics, samples = self.run_eval()
        if self.args.fsdp:  # the whole model gathered to rank 0's host
            from .fsdp import full_state_dict

            state = full_state_dict(model)
        if not self.active:
            return
        metrics = {**metrics, "perf/train_s": t_eval - self.t_start - self.eval_s}
        self.log(step, metrics, samples, kind="eval")
        if samples:
            print("   " + " · ".join(f"{s['prompt'][-7:]} → {s['completion']}" for s in samples[:6]))
        distinct = metrics.get("eval/distinct", 1)  # below 0.8: a collapse (so is any fall of 0.2 from 1);
        if distinct < 0.8 * metrics.get("eval/distinct_answers", 1):  # right answers may repeat: 0.8 x theirs
            top, count = collections.Counter(s["completion"] for s in samples).most_common(1)[0]
            fix = "--scale-rewards none, " * (getattr(self.args, "scale_rewards", "none") != "none")
            kl = next((name for name in ("beta", "kl_coef") if hasattr(self.args, name)), None)  # ppo_rlhf
            fix += f"a --{kl.replace('_', '-')} above {getattr(self.args, kl)}, " if kl else ""
            print(f"collapse: {distinct:.0%} distinct names, {top!r} answers {count} of {len(samples)} eval "
                  "prompts: the policy has found what the judge loves (reward hacking); counter it with "
                  f"{fix}a lower --learning-rate or a judge that also scores the fit (+correct)", flush=True)
        if self.args.lora_merge:  # LoRA: a plain model with the adapters merged in
            from .lora import save_merged

            save_merged(model, self.tokenizer, os.path.join(self.dir, "model"))
        else:  # LoRA: the adapters in PEFT's format (adapter_config.json, adapter_model.safetensors)
            save_atomic(model, self.tokenizer, os.path.join(self.dir, "model"), state_dict=state)
        self.eval_s += time.perf_counter() - t_eval
        self.evals.append(metrics)

    def save_checkpoint(self, step: int, state: dict) -> None:
        """Every rank: its random states (FSDP: its shards of the models and optimizer); rank 0: the models,
        the optimizer and state.json; then `latest` moves to this step and older checkpoints go. Like the
        evals, left out of perf/train_s."""
        t_save, folder = time.perf_counter(), os.path.join(self.dir, "checkpoints")
        tmp = os.path.join(folder, f"step-{step}.tmp")
        if self.active:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        if self.world > 1:
            dist.barrier()
        kind, keys, *rest = np.random.get_state()  # plain lists and tensors: torch.load(weights_only=True)
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        states = {"python": random.getstate(), "numpy": [kind, keys.tolist(), *rest], "cuda": cuda,
                  "torch": torch.get_rng_state(), "data": self.rng.bit_generator.state}  # fmt: skip
        torch.save(states, f"{tmp}/rng-rank{self.rank}.pt")
        if self.args.fsdp:  # every rank its shards (torch.distributed.checkpoint)
            from .fsdp import save_sharded

            save_sharded(self.models, self.optimizer, tmp)
        elif self.active:
            for name, model in self.models.items():
                if self.args.lora_rank:  # what trains only: the frozen base is --model's
                    save_file({k: p for k, p in model.named_parameters() if p.requires_grad},
                              f"{tmp}/{name}.safetensors")  # fmt: skip
                else:
                    save_model(model, f"{tmp}/{name}.safetensors")
            torch.save(self.optimizer.state_dict(), f"{tmp}/optimizer.pt")
        if self.active:
            train_s = time.perf_counter() - self.t_start - self.eval_s
            meta = dict(script=self.script, step=step, reference=self.base, train_s=train_s,
                        world=self.world, state=state)  # fmt: skip
            with open(f"{tmp}/state.json", "w") as f:
                json.dump(meta, f, default=lambda array: array.tolist())  # numpy arrays as lists
        if self.world > 1:
            dist.barrier()  # every rank's file is in place
        if self.active:
            for name in os.listdir(tmp):  # on disk before the switch makes them the newest checkpoint
                with open(f"{tmp}/{name}", "rb") as f:
                    os.fsync(f.fileno())
            with open(f"{folder}/latest.tmp", "w") as f:
                f.write(f"step-{step}")
                f.flush()
                os.fsync(f.fileno())
            shutil.rmtree(os.path.join(folder, f"step-{step}"), ignore_errors=True)
            os.replace(tmp, os.path.join(folder, f"step-{step}"))
            os.replace(f"{folder}/latest.tmp", f"{folder}/latest")  # the atomic switch
            for name in os.listdir(folder):
                if name.startswith("step-") and name != f"step-{step}":
                    shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
        self.eval_s += time.perf_counter() - t_save
