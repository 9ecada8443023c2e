"""REINFORCE with baselines, RLOO by default (Williams 1992; Ahmadian et al. 2024, arXiv:2402.14740).

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

import copy
import random
import time
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint

from common import all_gather, all_sum, autocast, cleanup_distributed, completion_forward, encode_prompt
from common import evaluate, frozen_copy, get_judge, init_distributed, judge_columns, load_checkpoint
from common import load_model_and_tokenizer, load_prompts, Logger, parse_args, resolve_device_dtype
from common import resumed_args, sample, sampling_config, sampling_seed, save_checkpoint, sync_gradients


@dataclass
class Args:
    # run
    exp_name: str = "default"
    """name of this experiment (part of the run folder's name)"""
    seed: int = 1
    """seed for python, numpy and torch (prompt order and sampling)"""
    output_dir: str = "runs"
    """runs go to output_dir/reinforce__exp_name__seed__time/"""
    resume: Optional[str] = None
    """a run folder to continue from its last checkpoint, in the same folder, with the same settings"""
    save_every: Optional[int] = None
    """save a checkpoint (weights, optimizer, step, random states) every this many steps; None = every eval"""
    track: bool = False
    """log to Weights & Biases (needs `pip install wandb`)"""
    wandb_project: str = "paint-post-training"
    """the W&B project of --track"""
    # model and task
    model: Optional[str] = None
    """HF causal LM to train (folder or hub id); None = the shipped painter"""
    device: str = "auto"
    """cuda if present, else cpu"""
    dtype: str = "auto"
    """compute dtype: bfloat16 autocast on cuda, float32 on cpu (trained weights, Adam state: float32)"""
    gradient_checkpointing: bool = False
    """recompute each layer's activations in backward instead of keeping them: less memory, ~30% more time"""
    judge: str = "poet+correct"
    """reward: a judge or weighted sum (common/judges.py), e.g. architect+correct, 0.7*poet+0.3*correct"""
    prompts: Optional[str] = None
    """JSONL of {"prompt", ...} rows (other columns go to the judge); None = the training-split hexes"""
    eval_prompts: Optional[str] = None
    """JSONL of held-out rows for the eval; None = the rows of a tenth of --prompts' prompts, held out"""
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
    """sequences per forward/backward pass (gradient accumulated; when smaller than B * G it must divide it
    and hold whole groups or an equal part of one)"""
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
def baseline_advantages(
    rewards: torch.Tensor, baseline: str, running_mean: float | None = None, decay: float = 0.9
) -> tuple[torch.Tensor, float | None]:
    """rewards (B, G) -> advantages (B, G) = reward - baseline, and the updated running mean.
    NOTE: groups are rows, i.e. formed by prompt index: two equal prompts in a batch stay two groups."""
    G = rewards.shape[1]
    if baseline == "rloo":  # mean of the OTHER G - 1 rewards; equals G/(G-1) * (r - group mean)
        return rewards - (rewards.sum(dim=1, keepdim=True) - rewards) / (G - 1), running_mean
    if baseline == "group-mean":
        return rewards - rewards.mean(dim=1, keepdim=True), running_mean
    if baseline == "moving-average":  # the baseline is the mean of PAST batches, so it ignores these rewards
        if running_mean is None:  # no past yet: no baseline; the running mean starts at this batch's mean
            return rewards, rewards.mean().item()
        return rewards - running_mean, decay * running_mean + (1 - decay) * rewards.mean().item()
    return rewards, running_mean


LOGITS_PER_BLOCK = 1 << 24  # 64 MB of fp32 logits: the most token_logprobs and entropy copy at once


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log pi(token) under the sampling distribution softmax(logits / T): (N, T, V), (N, T) -> (N, T) in fp32.
    NOTE: a block of rows at a time, recomputed in backward (checkpoint): log_softmax over all of (N, T, V)
    in fp32 would copy the logits at 4 bytes each and keep the copy for backward, 20 GB at N=64, T=512,
    V=151,936 (TRL selective_log_softmax, PR #2773). One block holds at most LOGITS_PER_BLOCK fp32 logits."""

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
def reinforce_loss(
    logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, n_sequences: int
) -> torch.Tensor:
    """-1/N sum_i A_i sum_t log pi(o_it): summed over each completion's tokens (the sequence is the action),
    divided by N of the WHOLE batch, so micro-batches add up to the full-batch gradient."""
    return -(advantages[:, None] * logprobs * mask).sum() / n_sequences


@torch.no_grad()
def entropy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Entropy (N, T) of the sampling distribution softmax(logits / T), a block of rows at a time."""
    rows = max(1, LOGITS_PER_BLOCK // max(1, logits.shape[1] * logits.shape[2]))
    blocks = [torch.log_softmax(block.float() / temperature, dim=-1) for block in logits.split(rows)]
    return torch.cat([-(logp.exp() * logp).sum(-1) for logp in blocks])


def completion_mask_from(
    completion_ids: torch.Tensor, stop_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, T) -> mask of the tokens up to and including the first stop token, and which rows never stopped.
    NOTE: found from the stop ids, not from the pad id, which may equal EOS; and from ALL of them (EOS, the
    model's EOS list, the chat template's end-of-turn), the same ones generation stops on
    (common.sampling_config)."""
    is_stop = torch.isin(completion_ids, stop_ids)
    first_stop = torch.where(is_stop.any(1), is_stop.float().argmax(1), completion_ids.shape[1])
    positions = torch.arange(completion_ids.shape[1], device=completion_ids.device)
    return (positions[None] <= first_stop[:, None]).float(), ~is_stop.any(1)


def forward_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature: float):
    """Log-probs (n, T) of the completion tokens and the logits (n, T, V) that predict them, for b prompts
    (b, P) each followed by n/b of the completions (n, T).
    NOTE: the prompt runs once for all its completions, which attend to copies of its keys and values
    (common.completion_forward): the same log-probs and gradient as n forwards over prompt + completion."""
    logits = completion_forward(model, prompt_ids, prompt_mask, completion_ids, completion_mask)
    return token_logprobs(logits, completion_ids, temperature), logits


def micro_batches(N: int, G: int, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(completion rows, their prompts' rows) of each micro-batch of `size` completions: whole groups, or
    part of one group."""
    per_prompt = min(size, G)
    return [(s, s[::per_prompt] // G) for s in torch.arange(N).split(size)]


def batched_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature, parts):
    """forward_logprobs over the whole batch, a micro-batch at a time (for no-grad passes)."""
    return torch.cat(
        [
            forward_logprobs(model, prompt_ids[p], prompt_mask[p], completion_ids[s], completion_mask[s],
                             temperature)[0]
            for s, p in parts
        ]
    )  # fmt: skip


def main(args: Args) -> dict:
    args = resumed_args("reinforce", args) if args.resume else args  # --resume: the run's own settings
    rank, world = init_distributed(args.device)  # DDP: a world of one without torchrun (common/run.py)
    log = Logger("reinforce", args, rank)  # the run folder, metrics.jsonl, the console; only rank 0 writes
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(sampling_seed(args.seed, rank))  # DDP: each rank samples its own completions
    rng = np.random.default_rng(args.seed)  # the same prompt order on every rank
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by the {world} processes")
    B, G = args.batch_size // world, args.group_size  # B: this rank's prompts, each with its whole group
    N = B * G  # this rank's completions
    if G < 2 and args.baseline in ("group-mean", "rloo"):
        raise ValueError(
            f"--group-size {G}: the {args.baseline} baseline needs at least 2 completions per prompt"
        )
    m = args.micro_batch_size
    if N > m and (N % m or (m % G and G % m)):
        raise ValueError(
            f"--micro-batch-size {m} must divide batch_size * group_size / processes = {N}, and hold whole "
            f"groups of {G} or an equal part of one"
        )

    # the prompts, the judge, the policy (fp32 master weights) and its frozen reference (may be bf16)
    rows, eval_rows = load_prompts(args.prompts, args.batch_size, args.eval_size, args.eval_prompts)
    eval_extra = judge_columns(eval_rows)  # the rows' other columns ("answer", ...) go to the judge
    judge = get_judge(args.judge, args.device, [r["prompt"] for r in rows + eval_rows])
    device, dtype = resolve_device_dtype(args.device, args.dtype)  # dtype: what autocast computes in
    model, tokenizer = load_model_and_tokenizer(args.model, args.device)
    ref_model = None
    if args.beta > 0:  # NOTE: with beta = 0 the reference is never loaded: one model less in memory
        ref_model = copy.deepcopy(model).to(dtype).eval().requires_grad_(False)
    start_model = ref_model  # eval/kl's starting policy: the reference, or (rank 0 evaluates) a host copy
    if start_model is None and log.active:
        start_model = frozen_copy(model, dtype, "cpu")
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    # the sampler: plain sampling at temperature from our flags only; its stop ids also end the masks
    sampling = sampling_config(tokenizer, model, args.temperature, args.max_new_tokens)
    stop_ids = torch.tensor(sampling.eos_token_id, device=device)
    ddp_model = DDP(model) if world > 1 else model  # DDP: averages the gradients in backward
    # NOTE: fused: one kernel for all the parameters, not a loop over them (TRL's default adamw_torch_fused)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.0, fused=True)

    def run_eval() -> tuple[dict, list[dict]]:  # eval/kl: the drift from start_model, the starting policy
        prompts, T = [r["prompt"] for r in eval_rows], args.temperature
        return evaluate(
            model, tokenizer, judge, prompts, T, args.max_new_tokens, dtype, start_model, **eval_extra
        )

    # --resume: weights, optimizer, random states and step of the run's last checkpoint (common/checkpoint.py)
    start, state = load_checkpoint(log, {"model": model}, optimizer, rng) if args.resume else (1, {})
    running_mean = state.get("running_mean")  # the moving-average baseline's state
    # rank 0: the starting model
    eval_metrics = log.evaluate(0, run_eval, model, tokenizer) if start == 1 else {}
    for step in range(start, args.total_steps + 1):
        t0 = time.perf_counter()
        # 1. sample the batch's prompts; each is repeated G times, so rows i*G .. i*G+G-1 are prompt i's group
        batch_rows = [rows[i] for i in rng.choice(len(rows), size=args.batch_size, replace=False)]
        batch_rows = batch_rows[rank * B : (rank + 1) * B]  # DDP: this rank's B prompts; a group never splits
        prompts = [r["prompt"] for r in batch_rows for _ in range(G)]
        prompt_ids = [encode_prompt(tokenizer, r["prompt"]) for r in batch_rows]
        encoded = tokenizer.pad({"input_ids": prompt_ids}, padding=True, return_tensors="pt").to(device)
        prompt_ids, prompt_mask = encoded["input_ids"], encoded["attention_mask"]  # (B, P), left padded
        P = prompt_ids.shape[1]

        # 2. generate G completions per prompt (KV cache, plain sampling at temperature, dropout off)
        with autocast(device, dtype):
            sequences = sample(model, prompt_ids, prompt_mask, sampling, repeats=G)  # (N, P+T)
        completion_ids = sequences[:, P:]  # (N, T)
        completion_mask, truncated = completion_mask_from(completion_ids, stop_ids)
        completion_len = completion_mask.sum(1).mean()
        if args.mask_truncated:
            completion_mask = completion_mask * (~truncated)[:, None]

        # 3. score every completion with the judge (TRL's reward-function signature)
        completions = [c.strip() for c in tokenizer.batch_decode(completion_ids, skip_special_tokens=True)]
        extra = judge_columns(batch_rows, repeat=G)  # every column but the prompt, one per completion
        # NOTE: which completions never stopped, too: the rm: judge reads those as unfinished
        scores = judge(prompts, completions, truncated=truncated.tolist(), **extra)
        rewards = torch.tensor(scores, dtype=torch.float32)  # (N,)

        # 4. the k1 KL penalty in the reward, from log-probs of the sampling policy and the reference
        parts = micro_batches(N, G, args.micro_batch_size)  # (completions, their prompts) of each micro-batch
        batch = (prompt_ids, prompt_mask, completion_ids, completion_mask, args.temperature, parts)
        kl = torch.zeros(N, device=device)
        if ref_model is not None:
            with torch.no_grad(), autocast(device, dtype):
                logprobs, ref_logprobs = batched_logprobs(model, *batch), batched_logprobs(ref_model, *batch)
            kl = kl_penalty(logprobs, ref_logprobs, completion_mask)  # (N,)
        shaped_rewards = rewards.to(device) - args.beta * kl

        # 5. advantages: reward minus baseline, from the whole batch's rewards, then this rank's rows (so
        # every rank also keeps the same moving average)
        # DDP: (world * N,), rank order
        all_rewards, all_shaped = all_gather(rewards), all_gather(shaped_rewards)
        all_advantages, running_mean = baseline_advantages(
            all_shaped.view(-1, G), args.baseline, running_mean, args.baseline_decay
        )
        advantages = all_advantages.view(-1)[rank * N : (rank + 1) * N]  # (N,)

        # 6. one on-policy update, accumulated over micro-batches
        # DDP: the gradients are AVERAGED over ranks, so each rank divides by its own N = B * G = whole batch
        # / world: then k processes with B/k prompts each give the gradient of one process with all B prompts
        logging = step % args.log_every == 0
        loss_sum, entropy_sum = torch.zeros(()), torch.zeros(())  # over micro-batches
        for i, (s, p) in enumerate(parts):  # s: the micro-batch's completions, p: their prompts
            mask = completion_mask[s]
            with sync_gradients(ddp_model, sync=i == len(parts) - 1):  # DDP: all-reduce in the last one
                with autocast(device, dtype):  # the forward in bf16 (or fp32); the loss below in fp32
                    logprobs, logits = forward_logprobs(
                        ddp_model, prompt_ids[p], prompt_mask[p], completion_ids[s], mask, args.temperature
                    )
                loss = reinforce_loss(logprobs=logprobs, advantages=advantages[s], mask=mask, n_sequences=N)
                loss.backward()
            loss_sum += loss.detach().cpu()
            if logging:  # the entropy is a pass over the whole vocabulary: only on logging steps
                entropy_sum += (entropy(logits, args.temperature) * mask).sum().cpu()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        if not torch.isfinite(grad_norm):
            raise FloatingPointError(
                f"gradient is {float(grad_norm)} at step {step}; the last good model is in "
                f"{log.dir}/model: lower --learning-rate"
            )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_s = time.perf_counter() - t0

        # 7. log (DDP: summed over all ranks, so the metrics are the whole batch's), eval, save
        if logging:
            loss_all, entropy_all = all_sum(torch.stack([loss_sum, entropy_sum])).tolist()
            per_rank = torch.stack(
                [
                    completion_len,
                    truncated.float().mean(),
                    G * prompt_mask.sum() + completion_mask.sum(),
                    kl.sum(),
                ]
            )
            completion_len_all, truncated_all, tokens_all, kl_all = all_sum(per_rank.cpu()).tolist()
            all_tokens = max(float(all_sum(completion_mask.sum())), 1)
            group_std = all_rewards.view(-1, G).std(1) if G > 1 else torch.zeros(B)  # G = 1: no groups
            metrics = {
                "train/loss": loss_all / world,
                "train/reward": float(all_rewards.mean()),
                "train/reward_std": float(group_std.mean()),
                "train/frac_zero_std": float((group_std < 1e-6).float().mean()),
                "train/entropy": entropy_all / all_tokens,
                "train/grad_norm": float(grad_norm),
                "train/completion_len": completion_len_all / world,
                "train/truncated": truncated_all / world,
                "perf/step_s": step_s,
                "perf/tokens_per_s": tokens_all / step_s,
            }
            if ref_model is not None:
                metrics["train/kl"] = kl_all / all_tokens
            log.log(step, metrics)
        if step % args.eval_every == 0 or step == args.total_steps:
            eval_metrics = log.evaluate(step, run_eval, model, tokenizer)
        if step % (args.save_every or args.eval_every) == 0 or step == args.total_steps:
            save_checkpoint(log, step, {"model": model}, optimizer, rng, running_mean=running_mean)
    del ddp_model  # DDP: free the wrapper before leaving the process group
    cleanup_distributed()
    log.close()
    return {**eval_metrics, "run_dir": log.dir}


if __name__ == "__main__":
    main(parse_args(Args, __doc__))
