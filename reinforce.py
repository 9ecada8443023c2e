"""REINFORCE with baselines, RLOO by default (Williams 1992; Ahmadian et al. 2024, "Back to Basics", arXiv:2402.14740).

The simplest correct policy gradient. For each prompt q, sample G completions o_1..o_G from the current
policy and score them: r_1..r_G. Following the RLOO paper (§3-4), the KL to a frozen reference enters
the REWARD as a k1 penalty (a number, no gradient), and each whole completion is one action:
    R_i = r_i - beta sum_t (log pi(o_it | q, o_i<t) - log pi_ref(o_it | q, o_i<t))
    A_i = R_i - b_i,        grad J = 1/N sum_i A_i grad sum_t log pi(o_it | q, o_i<t)
The baseline b_i (any b_i that does not depend on o_i keeps the estimate unbiased) is a flag:
    none            b_i = 0                                  (Williams 1992: high variance)
    moving-average  b_i = running mean of past rewards       (Williams 1992 §6; a value-free critic)
    group-mean      b_i = mean_j R_j over the group          (slightly biased: includes R_i itself)
    rloo            b_i = mean_{j != i} R_j = leave one out  (Kool et al. 2019; Ahmadian et al. 2024)
No ratio, no clip, no old policy: one on-policy update per batch. Compare grpo.py: the same loop with a
std-scaled group baseline, a clipped ratio (for reusing a batch) and the KL in the loss.
Differences from the paper: (1) a judge, not a reward model; (2) constant learning rate.
Shapes: B prompts per step, G completions per prompt, N = B*G sequences, P prompt tokens (left padded),
T completion tokens, V vocab.
Run: python reinforce.py --group-size 8     (several processes: torchrun --nproc_per_node 2 reinforce.py)
"""
import contextlib
import copy
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from typing import Literal, Optional

import numpy as np
import torch
import torch.distributed as dist
import tyro
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint

from common import (PROMPT, autocast, color_names, encode_prompt, eval_prompts, evaluate, get_judge,
                    load_model_and_tokenizer, read_jsonl, resolve_device_dtype, sample, sampling_config, save_atomic)


@dataclass
class Args:
    # run
    exp_name: str = "default"
    """name of this experiment (part of the run folder's name)"""
    seed: int = 1
    """seed for python, numpy and torch (prompt order and sampling)"""
    output_dir: str = "runs"
    """runs go to output_dir/reinforce__exp_name__seed__time/"""
    track: bool = False
    """log to Weights & Biases (needs `pip install wandb`)"""
    # model and task
    model: Optional[str] = None
    """HF causal LM to train (folder or hub id); None = the shipped painter"""
    device: str = "auto"
    """cuda if present, else cpu"""
    dtype: str = "auto"
    """compute dtype: bfloat16 autocast on cuda, float32 on cpu (trained weights and Adam state stay float32)"""
    gradient_checkpointing: bool = False
    """recompute each layer's activations in backward instead of keeping them: less memory, ~30% more time"""
    judge: str = "poet+correct"
    """reward: a judge name or weighted sum (common/judges.py), e.g. architect+correct, 0.7*poet+0.3*correct"""
    prompts: Optional[str] = None
    """JSONL of {"prompt", "answer"?} rows (answer goes to the judge); None = the training-split hexes"""
    # algorithm
    group_size: int = 8
    """G: completions sampled per prompt"""
    baseline: Literal["none", "moving-average", "group-mean", "rloo"] = "rloo"
    """b: subtracted from each reward: nothing, a running mean, the group mean, or leave-one-out (RLOO)"""
    baseline_decay: float = 0.9
    """moving-average baseline: b <- decay * b + (1 - decay) * mean reward of the batch"""
    beta: float = 0.05
    """beta: weight of the k1 KL penalty in the reward (0 = no reference loaded; TRL RLOO's default 0.05)"""
    mask_truncated: bool = False
    """drop completions that hit max_new_tokens without EOS from the loss (TRL mask_truncated_completions)"""
    temperature: float = 1.0
    """sampling temperature; log-probs are computed from logits / temperature to match the sampler"""
    max_new_tokens: int = 8
    """T: longest completion (painter names take 2-4 tokens plus EOS)"""
    # optimisation
    total_steps: int = 400
    """generate-score-update steps"""
    batch_size: int = 8
    """B: prompts per step (N = B * G completions)"""
    micro_batch_size: int = 64
    """sequences per forward/backward pass (gradient accumulated; must divide B * G when smaller)"""
    learning_rate: float = 2e-4
    """Adam learning rate (constant)"""
    max_grad_norm: float = 1.0
    """clip the global gradient norm to this"""
    # eval and logging
    eval_every: int = 100
    """evaluate (and save) every this many steps, and at the start and end"""
    eval_size: int = 64
    """held-out prompts per eval"""
    log_every: int = 10
    """print and log train metrics every this many steps"""


# ALGO: the baselines (Williams 1992; RLOO: Kool et al. 2019, Ahmadian et al. 2024 Eq. 5)
def baseline_advantages(rewards: torch.Tensor, baseline: str, running_mean: float | None = None,
                        decay: float = 0.9) -> tuple[torch.Tensor, float | None]:
    """rewards (B, G) -> advantages (B, G) = reward - baseline, and the updated running mean.
    NOTE: groups are rows, i.e. formed by prompt index: two equal prompts in a batch stay two groups."""
    G = rewards.shape[1]
    if baseline == "rloo":  # mean of the OTHER G - 1 rewards; equals G/(G-1) * (r - group mean)
        return rewards - (rewards.sum(dim=1, keepdim=True) - rewards) / (G - 1), running_mean
    if baseline == "group-mean":
        return rewards - rewards.mean(dim=1, keepdim=True), running_mean
    if baseline == "moving-average":  # the baseline is the mean of PAST batches, so it ignores these rewards
        b = rewards.mean().item() if running_mean is None else running_mean
        return rewards - b, decay * b + (1 - decay) * rewards.mean().item()
    return rewards, running_mean


LOGITS_PER_BLOCK = 1 << 24  # 64 MB of fp32 logits: the most token_logprobs and entropy copy at once


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log pi(token) under the sampling distribution softmax(logits / T): (N, T, V), (N, T) -> (N, T) in fp32.
    NOTE: a block of rows at a time, recomputed in backward (checkpoint): log_softmax over all of (N, T, V) in fp32
    would copy the logits at 4 bytes each and keep the copy for backward, 20 GB at N=64, T=512, V=151,936
    (TRL selective_log_softmax, PR #2773). One block holds at most LOGITS_PER_BLOCK fp32 logits."""
    def block_logprobs(block_logits, block_tokens):
        # NOTE: without the / temperature the trainer differentiates a different policy than the sampler's
        logp = torch.log_softmax(block_logits.float() / temperature, dim=-1)
        return logp.gather(-1, block_tokens.unsqueeze(-1)).squeeze(-1)
    rows = max(1, LOGITS_PER_BLOCK // max(1, logits.shape[1] * logits.shape[2]))
    blocks = zip(logits.split(rows), tokens.split(rows))
    return torch.cat([checkpoint(block_logprobs, lg, tk, use_reentrant=False) for lg, tk in blocks])


# ALGO: the KL penalty in the reward: k1 summed over the completion, a number with no gradient
def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum_t (log pi - log pi_ref) per completion (N,): an unbiased estimate of KL(pi || pi_ref) for the
    whole sequence on samples from pi (RLOO paper §3; TRL RLOOTrainer). Per token it can be negative."""
    return ((logprobs - ref_logprobs) * mask).sum(1)


# ALGO: the REINFORCE loss: -A_i times the log-probability of the whole completion (RLOO paper Eq. 2)
def reinforce_loss(logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, n_sequences: int) -> torch.Tensor:
    """-1/N sum_i A_i sum_t log pi(o_it): summed over each completion's tokens (the sequence is the action),
    divided by N of the WHOLE batch, so micro-batches add up to the full-batch gradient."""
    return -(advantages[:, None] * logprobs * mask).sum() / n_sequences


@torch.no_grad()
def entropy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Entropy (N, T) of the sampling distribution softmax(logits / T) at each position, a block of rows at a time."""
    rows = max(1, LOGITS_PER_BLOCK // max(1, logits.shape[1] * logits.shape[2]))
    blocks = [torch.log_softmax(block.float() / temperature, dim=-1) for block in logits.split(rows)]
    return torch.cat([-(logp.exp() * logp).sum(-1) for logp in blocks])


def completion_mask_from(completion_ids: torch.Tensor, stop_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, T) -> mask of the tokens up to and including the first stop token, and which rows never stopped.
    NOTE: found from the stop ids, not from the pad id, which may equal EOS; and from ALL of them (EOS, the model's
    EOS list, the chat template's end-of-turn), the same ones generation stops on (common.sampling_config)."""
    is_stop = torch.isin(completion_ids, stop_ids)
    first_stop = torch.where(is_stop.any(1), is_stop.float().argmax(1), completion_ids.shape[1])
    positions = torch.arange(completion_ids.shape[1], device=completion_ids.device)
    return (positions[None] <= first_stop[:, None]).float(), ~is_stop.any(1)


def forward_logprobs(model, input_ids, attention_mask, n_prompt: int, temperature: float):
    """Log-probs (N, T) of the completion tokens and the logits (N, T, V) that predict them."""
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)  # NOTE: left padding: real tokens start at 0
    logits = model(input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).logits
    logits = logits[:, n_prompt - 1 : -1]  # NOTE: logits at position t predict token t + 1
    return token_logprobs(logits, input_ids[:, n_prompt:], temperature), logits


# DDP: what makes the loop distributed (README "Scaling out"); without torchrun it is a world of one
def init_distributed(device: str) -> tuple[int, int]:
    """torchrun starts one process per rank and sets RANK, WORLD_SIZE and LOCAL_RANK: join the group
    (NCCL between GPUs, gloo between CPU processes) and return (rank, world size). Plain python: (0, 1)."""
    if "WORLD_SIZE" not in os.environ:
        return 0, 1
    on_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if on_cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # then "cuda" means this rank's GPU
    dist.init_process_group("nccl" if on_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """x summed over the ranks (NCCL reduces on the GPU, gloo on the CPU); x itself in a world of one."""
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


def main(args: Args) -> dict:
    t_start, eval_s = time.perf_counter(), 0.0  # wall clock; perf/train_s leaves out the evals
    run_name = f"reinforce__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = os.path.join(args.output_dir, run_name)
    rank, world = init_distributed(args.device)
    if rank == 0:
        print(json.dumps(asdict(args)))
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed + rank)  # DDP: each rank samples different completions (same weights everywhere)
    rng = np.random.default_rng(args.seed)  # the same prompt order on every rank
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by the {world} processes")
    B, G = args.batch_size // world, args.group_size  # B: this rank's prompts, each with its whole group
    if G < 2 and args.baseline in ("group-mean", "rloo"):
        raise ValueError(f"--group-size {G}: the {args.baseline} baseline needs at least 2 completions per prompt")
    if B * G > args.micro_batch_size and (B * G) % args.micro_batch_size:
        raise ValueError(f"--micro-batch-size {args.micro_batch_size} must divide batch_size * group_size / processes = {B * G}")

    # prompts: the user's JSONL rows (the eval takes the first ones), or the training-split hexes (the
    # eval takes the held-out ones)
    if args.prompts is not None:
        rows = read_jsonl(args.prompts, ("prompt",))
    else:
        rows = [{"prompt": PROMPT.format(hex=h)} for h in sorted({h for _, h in color_names("train")})]
    if len(rows) < args.batch_size:
        raise ValueError(f"{len(rows)} prompts for a batch of {args.batch_size}: lower --batch-size or add prompts")
    eval_rows = [{"prompt": p} for p in eval_prompts(args.eval_size)] if args.prompts is None else rows[: args.eval_size]
    eval_extra = {"answer": [r["answer"] for r in eval_rows]} if "answer" in eval_rows[0] else {}
    judge = get_judge(args.judge, args.device)
    device, dtype = resolve_device_dtype(args.device, args.dtype)  # dtype: what autocast computes in
    model, tokenizer = load_model_and_tokenizer(args.model, args.device)  # fp32 master weights
    ref_model = None
    if args.beta > 0:  # NOTE: with beta = 0 the reference is never loaded: one model less in memory
        ref_model = copy.deepcopy(model).to(dtype).eval().requires_grad_(False)  # frozen: may be bf16
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    # the sampler: plain sampling at temperature from our flags only; its stop ids also end the masks
    sampling = sampling_config(tokenizer, model, args.temperature, args.max_new_tokens)
    stop_ids = torch.tensor(sampling.eos_token_id, device=device)
    # DDP: the wrapper all-reduces (averages) the gradients in backward; generate, eval and save use the bare model
    policy = DDP(model) if world > 1 else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.0)
    if rank == 0:  # DDP: only rank 0 writes the run folder, logs, evaluates and saves
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "args.json"), "w") as f:
            json.dump(asdict(args), f, indent=1)
    if args.track and rank == 0:
        import wandb
        wandb.init(project="paint-post-training", name=run_name, config=asdict(args))

    def log(metrics: dict, samples: list[dict] | None = None) -> None:
        if rank != 0:
            return
        with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if samples is not None:
            with open(os.path.join(run_dir, "samples.jsonl"), "a") as f:
                f.writelines(json.dumps({"step": metrics["step"], **s}) + "\n" for s in samples)
        if args.track:
            wandb.log(metrics, step=metrics["step"])
        print(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))

    def run_eval(step: int) -> dict:
        nonlocal eval_s
        t_eval = time.perf_counter()
        metrics, samples = evaluate(model, tokenizer, judge, [r["prompt"] for r in eval_rows], args.temperature,
                                    args.max_new_tokens, dtype=dtype, **eval_extra)
        log({"step": step, **metrics, "perf/train_s": t_eval - t_start - eval_s}, samples)
        print("   " + " · ".join(f"{s['prompt'][-7:]} → {s['completion']}" for s in samples[:6]))
        save_atomic(model, tokenizer, os.path.join(run_dir, "model"))
        eval_s += time.perf_counter() - t_eval
        return metrics

    eval_metrics = run_eval(0) if rank == 0 else {}
    running_mean = None  # the moving-average baseline's state
    for step in range(1, args.total_steps + 1):
        t0 = time.perf_counter()
        # 1. sample the batch's prompts; each is repeated G times, so rows i*G .. i*G+G-1 are prompt i's group
        batch_rows = [rows[i] for i in rng.choice(len(rows), size=args.batch_size, replace=False)]
        batch_rows = batch_rows[rank * B : (rank + 1) * B]  # DDP: this rank's B prompts; a group never splits
        prompts = [r["prompt"] for r in batch_rows for _ in range(G)]
        encoded = tokenizer.pad({"input_ids": [encode_prompt(tokenizer, r["prompt"]) for r in batch_rows]},
                                padding=True, return_tensors="pt").to(model.device)
        prompt_ids = encoded["input_ids"].repeat_interleave(G, 0)                 # (N, P)
        prompt_mask = encoded["attention_mask"].repeat_interleave(G, 0)
        P = prompt_ids.shape[1]
        if P + args.max_new_tokens > getattr(model.config, "max_position_embeddings", 1 << 30):
            raise ValueError(f"prompt of {P} tokens + --max-new-tokens {args.max_new_tokens} exceeds the model's context")

        # 2. generate G completions per prompt (KV cache, plain sampling at temperature, dropout off)
        with autocast(device, dtype):
            sequences = sample(model, prompt_ids, prompt_mask, sampling)           # (N, P+T)
        completion_ids = sequences[:, P:]                                           # (N, T)
        completion_mask, truncated = completion_mask_from(completion_ids, stop_ids)
        attention_mask = torch.cat([prompt_mask, completion_mask.long()], dim=1)   # (N, P+T)
        completion_len = completion_mask.sum(1).mean()
        if args.mask_truncated:
            completion_mask = completion_mask * (~truncated)[:, None]

        # 3. score every completion with the judge (TRL's reward-function signature)
        completions = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        extra = {"answer": [r["answer"] for r in batch_rows for _ in range(G)]} if "answer" in batch_rows[0] else {}
        rewards = torch.tensor(judge(prompts, [c.strip() for c in completions], **extra), dtype=torch.float32)
        if rewards.shape != (B * G,):
            raise ValueError(f"judge {args.judge!r} returned {rewards.numel()} scores for {B * G} completions: it must return one each")
        if not torch.isfinite(rewards).all():
            raise ValueError(f"judge {args.judge!r} returned {int((~torch.isfinite(rewards)).sum())} non-finite scores (NaN or inf)")

        # 4. the k1 KL penalty in the reward, from log-probs of the sampling policy and the reference
        kl = torch.zeros(B * G, device=model.device)
        if ref_model is not None:
            with torch.no_grad(), autocast(device, dtype):
                logprobs, ref_logprobs = (torch.cat([forward_logprobs(m, sequences[s], attention_mask[s], P, args.temperature)[0]
                                                     for s in torch.arange(B * G).split(args.micro_batch_size)])
                                          for m in (model, ref_model))
                kl = kl_penalty(logprobs, ref_logprobs, completion_mask)           # (N,)
        shaped_rewards = rewards.to(model.device) - args.beta * kl

        # 5. advantages: reward minus baseline, from the whole batch's rewards (DDP: gathered in rank order), then
        # this rank's rows; so every rank also keeps the same moving average
        all_rewards, all_shaped = all_gather(rewards), all_gather(shaped_rewards)  # (world * N,)
        advantages, running_mean = baseline_advantages(all_shaped.view(-1, G), args.baseline, running_mean, args.baseline_decay)
        advantages = advantages.view(-1)[rank * B * G : (rank + 1) * B * G]       # (N,)

        # 6. one on-policy update, accumulated over micro-batches
        # DDP: the gradients are AVERAGED over ranks, so each rank divides by its own B * G = whole batch / world:
        # then k processes with B/k prompts each give the gradient of one process with all B prompts
        micro_batches = torch.arange(B * G).split(args.micro_batch_size)
        sums = torch.zeros(2)  # loss, entropy: summed over micro-batches
        for i, s in enumerate(micro_batches):
            # DDP: all-reduce the gradients once, in the last micro-batch's backward
            with policy.no_sync() if world > 1 and i < len(micro_batches) - 1 else contextlib.nullcontext():
                with autocast(device, dtype):  # the forward in bf16 (or fp32); the loss below in fp32
                    logprobs, logits = forward_logprobs(policy, sequences[s], attention_mask[s], P, args.temperature)
                loss = reinforce_loss(logprobs, advantages[s], completion_mask[s], B * G)
                loss.backward()
            with torch.no_grad():  # the entropy is a pass over the whole vocabulary: only on logging steps
                logging = step % args.log_every == 0
                entropy_sum = (entropy(logits, args.temperature) * completion_mask[s]).sum() if logging else torch.zeros(())
                sums += torch.stack([loss, entropy_sum.to(loss.device)]).detach().cpu()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        if not torch.isfinite(grad_norm):
            raise FloatingPointError(f"gradient is {float(grad_norm)} at step {step}; the last good model is in "
                                     f"{run_dir}/model: lower --learning-rate")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_s = time.perf_counter() - t0

        # 7. log (DDP: sums over all ranks, so the metrics are the whole batch's), eval, save
        if step % args.log_every == 0:
            sums = all_sum(sums)
            counts = all_sum(torch.stack([completion_len, truncated.float().mean(), attention_mask.sum().float(), kl.sum()]).cpu())
            all_tokens = max(float(all_sum(completion_mask.sum())), 1)
            group_std = all_rewards.view(-1, G).std(1) if G > 1 else torch.zeros(B)  # G = 1: no groups
            metrics = {"step": step, "train/loss": float(sums[0]) / world, "train/reward": float(all_rewards.mean()),
                       "train/reward_std": float(group_std.mean()), "train/frac_zero_std": float((group_std < 1e-6).float().mean()),
                       "train/entropy": float(sums[1]) / all_tokens,
                       "train/grad_norm": float(grad_norm), "train/completion_len": float(counts[0]) / world,
                       "train/truncated": float(counts[1]) / world,
                       "perf/step_s": step_s, "perf/tokens_per_s": float(counts[2]) / step_s}
            if ref_model is not None:
                metrics["train/kl"] = float(counts[3]) / all_tokens
            log(metrics)
        if rank == 0 and (step % args.eval_every == 0 or step == args.total_steps):
            eval_metrics = run_eval(step)
    if world > 1:  # DDP: free the wrapper first: if its reducer held the group last, freeing it could deadlock
        del policy
        dist.barrier()  # wait for rank 0's last eval and save, then leave together
        dist.destroy_process_group()
    return {**eval_metrics, "run_dir": run_dir}


if __name__ == "__main__":
    try:
        main(tyro.cli(Args, description=__doc__))
    except (ValueError, OSError, FloatingPointError) as e:
        sys.exit(f"reinforce.py: error: {e}")
