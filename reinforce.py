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

import time
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import tyro
from torch.utils.checkpoint import checkpoint

from common.models import forward_sharing_prompts, load_model_and_tokenizer, sample, sampling_config  # model
from common.task import evaluate, get_judge, load_prompts  # the task: prompts, the judge, the eval
from common.run import Run  # the run: process group, seeds, run folder, logging, checkpoints, resume


@dataclass
class Args(Run.Args):  # and the run's settings (folders, resume, device, LoRA, FSDP: common/run.py)
    # run
    seed: int = 1
    """seed for python, numpy and torch (prompt order and sampling)"""
    # model and task
    model: Optional[str] = None
    """HF causal LM to train (folder or hub id); None = the shipped painter"""
    judge: str = "poet+correct"
    """reward: a judge or weighted sum (common/judges.py), e.g. architect+correct, 0.7*poet+0.3*correct;
    +overlong:L_MAX:L_CACHE adds DAPO's soft overlong punishment (the paper's: overlong:20480:4096)"""
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
    """drop completions that never stop from the loss (DAPO; TRL mask_truncated_completions)"""
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
    learning_rate: Optional[float] = None
    """Adam learning rate (constant); None = 2e-4 for the painter, 1e-6 for a --model (TRL's RLOO default)"""
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

    def block_entropy(block):  # NOTE: each block reduced before the next: one fp32 block exists at a time
        logp = torch.log_softmax(block.float() / temperature, dim=-1)
        return -(logp.exp() * logp).sum(-1)

    rows = max(1, LOGITS_PER_BLOCK // max(1, logits.shape[1] * logits.shape[2]))
    return torch.cat([block_entropy(block) for block in logits.split(rows)])


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
    (b, P), left padded, each followed by r = n/b of the completions (n, T): rows i*r .. i*r+r-1 follow
    prompt i."""
    P, r = prompt_ids.shape[1], len(completion_ids) // len(prompt_ids)
    input_ids = torch.cat([prompt_ids.repeat_interleave(r, 0), completion_ids], dim=1)  # (n, P+T)
    attention_mask = torch.cat([prompt_mask.repeat_interleave(r, 0), completion_mask.long()], dim=1)
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)  # NOTE: left padding: real tokens start at 0
    # NOTE: the one-token shift: the logits at position j predict token j+1, so completion token t is
    # predicted at P-1+t, and the last token predicts nothing: it is not fed
    inputs = (input_ids[:, :-1], attention_mask[:, :-1], position_ids[:, :-1])
    # = model(*inputs).logits[:, P - 1 :], with each prompt run once for its r completions (tested equal)
    logits = forward_sharing_prompts(model, *inputs, prompt_length=P, repeats=r)  # (n, T, V)
    return token_logprobs(logits, completion_ids, temperature), logits


def micro_batches(N: int, G: int, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(completion rows, their prompts' rows) of each micro-batch of `size` completions: whole groups, or
    part of one group."""
    per_prompt = min(size, G)
    return [(s, s[::per_prompt] // G) for s in torch.arange(N).split(size)]


def batched_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature, parts):
    """forward_logprobs over the whole batch, a micro-batch at a time (for no-grad passes)."""
    micro = [(prompt_ids[p], prompt_mask[p], completion_ids[s], completion_mask[s]) for s, p in parts]
    return torch.cat([forward_logprobs(model, *inputs, temperature)[0] for inputs in micro])


def main(args: Args) -> dict:
    # DDP: each rank samples its own completions; --learning-rate: the painter's, or TRL's for a --model
    run = Run("reinforce", args, seed_per_rank=True, learning_rate=(2e-4, 1e-6))
    args = run.args  # --resume: the run's own settings
    B, G = args.batch_size // run.world, args.group_size  # DDP: B: this rank's prompts, each with its group
    N = B * G  # this rank's completions
    if args.batch_size % run.world:
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by the {run.world} processes")
    if G < 2 and args.baseline in ("group-mean", "rloo"):
        raise ValueError(f"--group-size {G}: the {args.baseline} baseline needs at least 2 completions each")
    m = args.micro_batch_size
    if N > m and (N % m or (m % G and G % m)):
        raise ValueError(
            f"--micro-batch-size {m} must divide batch_size * group_size / processes = {N}, and hold whole "
            f"groups of {G} or an equal part of one"
        )

    # the prompts, the judge, the policy (fp32 master weights) and its frozen reference
    rows, eval_rows = load_prompts(args.prompts, args.eval_prompts, args.batch_size, args.eval_size)
    judge = get_judge(args.judge, args.device, [r["prompt"] for r in rows + eval_rows])
    model, tokenizer = load_model_and_tokenizer(args.model, run.load_device)  # FSDP: on the host
    model = run.lora(model)  # LoRA: rank-R adapters, the base frozen (common/lora.py); else the model itself
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    # NOTE: train mode, or transformers never recomputes a checkpointed layer (dropout is off all the same)
    model.train()
    # NOTE: the reference is an fp32 copy run under the same autocast: it computes exactly what the policy
    # computed at step 0 (a bf16 copy keeps norms and residuals in bf16: a KL to rounding noise)
    # and, copied after the checkpointing flag, takes the policy's forward path (plain, not prompt-shared)
    ref_model = None  # LoRA: the policy with its adapters off (no copy); FSDP: a sharded copy
    if args.beta > 0:  # NOTE: with beta = 0 the reference is never loaded: one model less in memory
        ref_model = run.reference(model)
    start_model = ref_model  # eval/kl's starting policy: the reference, or (rank 0 evaluates) a host copy
    if start_model is None:
        start_model = run.reference(model, host=True)
    # the sampler: softmax(logits / temperature) from our flags only; its stop ids also end the masks
    sampling = sampling_config(tokenizer, model, args.temperature, args.max_new_tokens)
    stop_ids = torch.tensor(sampling.eos_token_id, device=run.device)
    ddp_model = run.wrap(model)  # DDP: averages the gradients in backward
    # NOTE: fused: one kernel for all the parameters, not a loop over them (TRL's default adamw_torch_fused)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.0, fused=True)

    def run_eval() -> tuple[dict, list[dict]]:  # eval/kl: the drift from start_model, the starting policy
        T = args.temperature
        return evaluate(model, tokenizer, judge, eval_rows, T, args.max_new_tokens, run.dtype, start_model)

    # --resume: the last checkpoint's weights, optimizer, random states and step; else the eval of step 0
    start, state = run.begin({"model": model}, optimizer, tokenizer, run_eval)
    running_mean = state.get("running_mean")  # the moving-average baseline's state
    for step in range(start, args.total_steps + 1):
        t0 = time.perf_counter()
        # 1. sample the batch's prompts; each is repeated G times, so rows i*G .. i*G+G-1 are prompt i's group
        batch_rows = [rows[i] for i in run.rng.choice(len(rows), size=args.batch_size, replace=False)]
        batch_rows = batch_rows[run.rank * B : (run.rank + 1) * B]  # DDP: this rank's prompts, whole groups
        prompts = [r["prompt"] for r in batch_rows for _ in range(G)]

        # 2. generate G completions per prompt from softmax(logits / temperature), nothing else (no top-k,
        # top-p or penalty), with a KV cache and dropout off; the prompts left padded (b, P)
        with run.autocast():
            prompt_ids, prompt_mask, completion_ids = sample(model, tokenizer, prompts[::G], sampling, G)
        completion_mask, truncated = completion_mask_from(completion_ids, stop_ids)  # (N, T)

        # 3. score every completion with the judge; TRL's reward signature: the rows' other columns ("answer")
        # as keyword arguments, one value per completion, which completions never stopped, their token ids
        completions = [c.strip() for c in tokenizer.batch_decode(completion_ids, skip_special_tokens=True)]
        columns = {key: [r[key] for r in batch_rows for _ in range(G)] for key in batch_rows[0]}
        del columns["prompt"]
        ids = [row[m > 0].tolist() for row, m in zip(completion_ids.cpu(), completion_mask.cpu())]
        scores = judge(prompts, completions, completion_ids=ids, truncated=truncated.tolist(), **columns)
        rewards = torch.tensor(scores, dtype=torch.float32)  # (N,)
        completion_len = completion_mask.sum(1).mean()
        if args.mask_truncated:  # NOTE: after the judge, which may count the tokens of every completion
            completion_mask = completion_mask * (~truncated)[:, None]

        # 4. the k1 KL penalty in the reward, from log-probs of the sampling policy and the reference
        parts = micro_batches(N, G, args.micro_batch_size)  # (completions, their prompts) of each micro-batch
        batch = (prompt_ids, prompt_mask, completion_ids, completion_mask, args.temperature, parts)
        kl = torch.zeros(N, device=run.device)
        if ref_model is not None:
            with torch.no_grad(), run.autocast():
                logprobs, ref_logprobs = batched_logprobs(model, *batch), batched_logprobs(ref_model, *batch)
            kl = kl_penalty(logprobs, ref_logprobs, completion_mask)  # (N,)
        shaped_rewards = rewards.to(run.device) - args.beta * kl

        # 5. advantages: reward minus baseline, from the whole batch's rewards, then this rank's rows (so
        # every rank keeps the same moving average)
        all_rewards, all_shaped = run.all_gather(rewards), run.all_gather(shaped_rewards)  # DDP: rank order
        all_advantages, running_mean = baseline_advantages(
            all_shaped.view(-1, G), args.baseline, running_mean, args.baseline_decay
        )
        advantages = all_advantages.view(-1)[run.rank * N : (run.rank + 1) * N]  # (N,)

        # 6. one on-policy update, accumulated over micro-batches and ended by one optimiser step
        # DDP: the gradients are AVERAGED over ranks, so each rank divides by its share of the whole batch's
        # count (of completions or tokens): k processes with B/k prompts give the gradient of one with B
        n_tokens = float(run.all_sum(completion_mask.sum())) / run.world
        logging = step % args.log_every == 0
        for i, (s, p) in enumerate(parts):  # s: the completions, p: their prompts
            if i % len(parts) == 0:  # a pass begins: its sums over the micro-batches, for the log
                loss_sum, entropy_sum = torch.zeros(()), torch.zeros(())
            last = (i + 1) % len(parts) == 0  # the pass's last micro-batch: DDP all-reduces, then a step
            mask = completion_mask[s]
            with run.sync_gradients(ddp_model, sync=last):
                with run.autocast():  # the forward in bf16 (or fp32); the loss below in fp32
                    logprobs, logits = forward_logprobs(
                        ddp_model, prompt_ids[p], prompt_mask[p], completion_ids[s], mask, args.temperature
                    )
                loss = reinforce_loss(logprobs=logprobs, advantages=advantages[s], mask=mask, n_sequences=N)
                loss.backward()
            loss_sum += loss.detach().cpu()
            if logging:  # the entropy is a pass over the whole vocabulary: only on logging steps
                entropy_sum += (entropy(logits, args.temperature) * mask).sum().cpu()
            if last:
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                run.check_finite(grad_norm, step, "gradient")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        step_s = time.perf_counter() - t0

        # 7. log (a tensor: the mean over the ranks), evaluate and save on schedule
        metrics = None
        if logging:
            group_std = all_rewards.view(-1, G).std(1) if G > 1 else torch.zeros(B)  # G = 1: no groups
            tokens = max(n_tokens, 1)  # DDP: this rank's share of the batch's completion tokens
            metrics = {
                "train/loss": loss_sum,
                "train/reward": float(all_rewards.mean()),
                "train/reward_std": float(group_std.mean()),
                "train/frac_zero_std": float((group_std < 1e-6).float().mean()),
                "train/entropy": entropy_sum.double() / tokens,
                "train/grad_norm": float(grad_norm),
                "train/completion_len": completion_len,
                "train/truncated": truncated.float().mean(),
                "perf/step_s": step_s,
                "perf/tokens_per_s": (G * prompt_mask.sum() + completion_mask.sum()) / step_s,
            }
            if ref_model is not None:
                metrics["train/kl"] = kl.sum().double() / tokens
        run.end_step(step, args.total_steps, metrics, running_mean=running_mean)
    return run.close()


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
