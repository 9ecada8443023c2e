"""SFT — supervised fine-tuning with a completion-only loss (InstructGPT, Ouyang et al. 2022, §3.5).

For prompt/completion pairs (x_i, y_i), minimise the negative log-likelihood of each completion and of
the EOS token after it (the token that teaches the model to stop), never of the prompt:
    L = -(1/N) sum_i sum_{t=1..|y_i|+1} log p(y_it | x_i, y_i<t),   y_i,|y_i|+1 = EOS
where N counts the completion tokens of the whole optimiser batch. Dividing by that count, taken before
the micro-batches run, makes k accumulated micro-batches of B/k give the gradient of one batch of B
(a mean per micro-batch would not: it weights tokens of short micro-batches more).

Without --model this file builds the repository's default model, common/painter, from scratch: a
word-level tokenizer over the colour names (so every name it samples is made of real words) and a
small Llama. The built-in data mixes real names, their hexes jittered a little, with random colours
named by their nearest xkcd colour, which teach which words mean which colours.
Shapes: B batch, P prompt tokens (left padded), T completion tokens (right padded), V vocab.
Run: python sft.py                                   # a new painter, ~16 min on 2 CPU cores
     python sft.py --model Qwen/Qwen2.5-0.5B-Instruct --data pairs.jsonl --learning-rate 1e-5
"""

import math
import time
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import tyro
from torch.utils.checkpoint import checkpoint

from common.models import forward_sharing_prompts, load_model_and_tokenizer, save_atomic  # the model
from common.task import evaluate, get_judge, load_examples, paint_task  # the task: rows, judge, eval
from common.run import Run  # the run: process group, seeds, run folder, logging, checkpoints, resume


@dataclass
class Args(Run.Args):  # and the run's settings (folders, resume, device, LoRA, FSDP: common/run.py)
    # run
    seed: int = 1
    """seed for python, numpy and torch (data order, initial weights, sampling)"""
    save_to: Optional[str] = None
    """also save the final model here (`--save-to common/painter` replaces the shipped painter)"""
    # model
    model: Optional[str] = None
    """HF causal LM to fine-tune (folder or hub id); None builds a new painter from scratch"""
    # from scratch only (without --model): the painter's recipe, common/recipe.py
    tokenizer: Literal["word", "bpe", "byte"] = "word"
    """word-level over the data's words, byte-level BPE (1024), or raw bytes"""
    d_model: int = 128
    """hidden size"""
    n_layers: int = 4
    """transformer blocks"""
    n_heads: int = 4
    """attention heads"""
    d_ff: int = 384
    """MLP hidden size"""
    # data
    data: Optional[str] = None
    """JSONL file of {"prompt", "completion"} rows; None = the built-in colour names"""
    eval_data: Optional[str] = None
    """JSONL of held-out rows, whose prompts the eval samples; None = a tenth of --data's prompts, held out"""
    synthetic_frac: float = 0.5
    """built-in data: share of each batch that is random colours named by their nearest xkcd colour"""
    jitter: int = 8
    """built-in data: each name's hex moves by up to +-jitter per RGB channel"""
    # optimisation
    total_steps: int = 8000
    """optimiser steps (8000: every seed of the painter's recipe reaches its plateau, tests/bench)"""
    batch_size: int = 64
    """sequences per optimiser step"""
    grad_accum_steps: int = 1
    """split each batch into this many micro-batches (same gradient, less memory)"""
    learning_rate: Optional[float] = None
    """peak learning rate; None = 5e-3 for the painter (from scratch), 2e-5 for a --model (TRL's SFT
    default)"""
    warmup_steps: int = 50
    """linear warm-up steps, then cosine decay"""
    min_lr_ratio: float = 0.1
    """the cosine decays to learning_rate * min_lr_ratio"""
    weight_decay: float = 0.1
    """AdamW weight decay on weight matrices"""
    max_grad_norm: float = 1.0
    """clip the global gradient norm to this"""
    # eval and logging
    judge: str = "correct"
    """judge reported as eval/reward (see common/judges.py)"""
    eval_every: int = 500
    """evaluate (and save) every this many steps, and at the start and end"""
    eval_size: int = 64
    """held-out prompts per eval"""
    log_every: int = 50
    """print and log train metrics every this many steps"""
    temperature: float = 1.0
    """sampling temperature of the eval"""
    max_new_tokens: int = 8
    """longest sampled completion in the eval (the RL scripts' default, so eval/reward compares)"""


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """(prompt_ids, completion_ids) pairs -> prompt_ids, prompt_mask (B, P), left padded, and completion_ids,
    completion_mask (B, T), right padded: the prompt is context, the completion (EOS included) the target.

    NOTE: completion_mask is built from lengths, never by comparing with pad_id, so when pad == EOS the
    final EOS is still trained."""
    P, T = max(len(p) for p, _ in examples), max(len(c) for _, c in examples)
    prompt_ids = torch.full((len(examples), P), pad_id)
    prompt_mask = torch.zeros(len(examples), P, dtype=torch.long)
    completion_ids = torch.full((len(examples), T), pad_id)
    completion_mask = torch.zeros(len(examples), T)
    for i, (p, c) in enumerate(examples):
        prompt_ids[i, P - len(p) :], prompt_mask[i, P - len(p) :] = torch.tensor(p), 1
        completion_ids[i, : len(c)], completion_mask[i, : len(c)] = torch.tensor(c), 1
    return prompt_ids, prompt_mask, completion_ids, completion_mask


LOGITS_PER_BLOCK = 1 << 24  # 64 MB of fp32 logits: the most token_logprobs copies at once


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token): (B, T, V), (B, T) -> (B, T) in fp32.
    NOTE: a block of rows at a time, recomputed in backward (checkpoint): log_softmax (or cross_entropy)
    over all of (B, T, V) in fp32 would copy the logits at 4 bytes each and keep the copy for backward, 20
    GB at B=64, L=512, V=151,936 (TRL selective_log_softmax, PR #2773). One block holds at most
    LOGITS_PER_BLOCK fp32 logits."""

    def block_logprobs(block_logits, block_tokens):
        logp = torch.log_softmax(block_logits.float(), dim=-1)
        return logp.gather(-1, block_tokens.unsqueeze(-1)).squeeze(-1)

    rows = max(1, LOGITS_PER_BLOCK // max(1, logits.shape[1] * logits.shape[2]))
    blocks = zip(logits.split(rows), tokens.split(rows))
    return torch.cat([checkpoint(block_logprobs, lg, tk, use_reentrant=False) for lg, tk in blocks])


def completion_logits(model, prompt_ids, prompt_mask, completion_ids, completion_mask) -> torch.Tensor:
    """The logits (B, T, V) that predict each completion token, for B prompts (B, P), left padded, each
    followed by its completion (B, T), right padded."""
    P = prompt_ids.shape[1]
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # (B, P+T)
    attention_mask = torch.cat([prompt_mask, completion_mask.long()], dim=1)
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)  # NOTE: left padding: real tokens start at 0
    # NOTE: the one-token shift: the logits at position j predict token j+1, so completion token t is
    # predicted at P-1+t, and the last token predicts nothing: it is not fed
    inputs = (input_ids[:, :-1], attention_mask[:, :-1], position_ids[:, :-1])
    # = model(*inputs).logits[:, P - 1 :]: the lm head only where a completion token is predicted, and in a
    # large batch the columns every prompt shares run once (tested equal)
    return forward_sharing_prompts(model, *inputs, prompt_length=P, repeats=1)


# ALGO: the completion-only negative log-likelihood (InstructGPT §3.5; the prompt is never a target)
def completion_nll(
    logits: torch.Tensor, completion_ids: torch.Tensor, completion_mask: torch.Tensor
) -> torch.Tensor:
    """Sum over completion tokens (EOS included) of -log p(token | everything before it), from the logits
    (B, T, V) that predict each completion token (completion_logits makes the one-token shift)."""
    return -(token_logprobs(logits, completion_ids) * completion_mask).sum()


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, min_ratio: float) -> float:
    """Linear warm-up to peak, then cosine decay to peak * min_ratio (SGDR, Loshchilov & Hutter 2017, Eq. 5,
    without restarts; nanoGPT's get_lr)."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def main(args: Args) -> dict:
    # DDP: the same seed on every rank: the same initial weights and batches, of which each takes its share
    run = Run("sft", args, learning_rate=(5e-3, 2e-5))
    args = run.args  # --resume: the run's own settings
    if args.batch_size % (run.world * args.grad_accum_steps):
        parts = f"--grad-accum-steps {args.grad_accum_steps} x {run.world} processes"
        raise ValueError(f"--batch-size {args.batch_size} is not divisible by {parts}")

    # 1. the model: a pretrained one, or the painter's recipe (a tokenizer of the data's words, a small
    # Llama); fp32 weights either way, the forward in bf16 under autocast when --dtype says so
    if args.model is None:  # the paint task's recipe (common/recipe.py), which a copy may leave out
        new_painter = paint_task("recipe", "sft.py without --model").new_painter
        architecture = (args.tokenizer, args.d_model, args.n_layers, args.n_heads, args.d_ff)
        model, tokenizer = new_painter(args.data, args.eval_data, *architecture)
        model = model.to(run.load_device)
    else:
        model, tokenizer = load_model_and_tokenizer(args.model, run.load_device)  # FSDP: on the host
    model = run.lora(model)  # LoRA: rank-R adapters, the base frozen (common/lora.py); else the model itself
    context = getattr(model.config, "max_position_embeddings", None) or 1 << 30  # some configs lack it

    # 2. the data: (prompt_ids, completion_ids + end token) pairs of the user's JSONL rows, or without --data
    # a function that draws new colours named by the built-in colour names (common/colours.py); the judge
    paint = dict(synthetic_frac=args.synthetic_frac, jitter=args.jitter)
    examples, eval_rows = load_examples(args.data, args.eval_data, tokenizer, context, args.eval_size,
                                        **paint)  # fmt: skip
    judge = get_judge(args.judge, args.device, [r["prompt"] for r in eval_rows])
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    # eval/kl's starting policy: a frozen fp32 copy in host memory, run where the model runs and under the
    # same autocast, so that it computes exactly what the model computed at step 0 (eval/kl 0, in bf16 too)
    start_model = run.reference(model, host=True)  # LoRA: the model with its adapters off (no copy)
    ddp_model = run.wrap(model)  # DDP: averages the gradients in backward

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    # NOTE: fused: one kernel for all the parameters, not a loop over them (TRL's default adamw_torch_fused)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.learning_rate,
        betas=(0.9, 0.95),
        fused=True,
    )

    def run_eval() -> tuple[dict, list[dict]]:  # eval/kl: the drift from start_model, the starting policy
        T = args.temperature
        return evaluate(model, tokenizer, judge, eval_rows, T, args.max_new_tokens, run.dtype, start_model)

    # --resume: the last checkpoint's weights, optimizer, random states and step; else the eval of step 0
    start, state = run.begin({"model": model}, optimizer, tokenizer, run_eval)
    order, cursor = state.get("order"), state.get("cursor", 0)  # with --data: the rows' order, the position
    if args.data is not None and start == 1:
        order = run.rng.permutation(len(examples))
    model.train()
    for step in range(start, args.total_steps + 1):
        t0 = time.perf_counter()
        # 3. one optimiser batch of B (prompt_ids, completion_ids) pairs: new colours, or the file's next rows
        if args.data is None:
            batch = examples(run.rng, args.batch_size)
        else:
            if cursor + args.batch_size > len(order):  # a new epoch: the rows left, then a new order
                order, cursor = [*order[cursor:], *run.rng.permutation(len(examples))], 0
            batch = [examples[i] for i in order[cursor : cursor + args.batch_size]]
            cursor += args.batch_size

        # 4. gradient of the loss over the whole batch, accumulated over micro-batches
        # NOTE: the token count is taken before the micro-batches run: one normaliser for all of them
        n_tokens = sum(len(c) for _, c in batch)
        # DDP: this rank's share of the batch; the gradients are AVERAGED over ranks, so each rank divides its
        # sum by n_tokens / world: then k processes with B/k rows give the gradient of one process with B rows
        share = args.batch_size // run.world
        batch = batch[run.rank * share : (run.rank + 1) * share]
        n_tokens = n_tokens / run.world
        micro = share // args.grad_accum_steps
        loss_sum = 0.0
        for first in range(0, share, micro):
            micro_batch = collate(batch[first : first + micro], tokenizer.pad_token_id)
            prompt_ids, prompt_mask, completion_ids, completion_mask = (t.to(run.device) for t in micro_batch)
            with run.sync_gradients(ddp_model, sync=first + micro >= share):  # DDP: all-reduce in the last
                with run.autocast():  # the forward in bf16 (or fp32); the loss below in fp32
                    inputs = (prompt_ids, prompt_mask, completion_ids, completion_mask)
                    logits = completion_logits(ddp_model, *inputs)
                loss = completion_nll(logits, completion_ids, completion_mask) / n_tokens
                loss.backward()
            loss_sum += loss.detach()
        run.check_finite(loss_sum, step, "loss", "lower --learning-rate or check the data")

        # 5. clip, schedule, step
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        lr = lr_at(step - 1, args.total_steps, args.warmup_steps, args.learning_rate, args.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_s = time.perf_counter() - t0

        # 6. log (averaged over the ranks), evaluate and save on schedule
        tokens = sum(len(p) + len(c) for p, c in batch)
        metrics = {"train/loss": loss_sum, "train/grad_norm": grad_norm, "train/lr": lr,
                   "perf/step_s": step_s, "perf/tokens_per_s": tokens / step_s}  # fmt: skip
        run.end_step(step, args.total_steps, metrics if step % args.log_every == 0 else None, order=order,
                     cursor=cursor)  # fmt: skip
    if args.save_to and run.active:
        save_atomic(model, tokenizer, args.save_to)
    return {"train/loss": float(loss_sum), **run.close()}


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
