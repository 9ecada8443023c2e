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
import random
import time
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint

from common import all_sum, autocast, cleanup_distributed, completion_forward, encode_examples, eval_prompts
from common import evaluate, frozen_copy, get_judge, init_distributed, load_checkpoint
from common import load_model_and_tokenizer, Logger, parse_args, read_jsonl, resolve_device_dtype
from common import resumed_args, sample_colour_pairs, save_atomic, save_checkpoint, split_by_prompt
from common import sync_gradients
from common.recipe import build_tokenizer, new_model, painter_texts, trainable_names


@dataclass
class Args:
    # run
    exp_name: str = "default"
    """name of this experiment (part of the run folder's name)"""
    seed: int = 1
    """seed for python, numpy and torch (data order, initial weights, sampling)"""
    output_dir: str = "runs"
    """runs go to output_dir/sft__exp_name__seed__time/"""
    save_to: Optional[str] = None
    """also save the final model here (`--save-to common/painter` replaces the shipped painter)"""
    resume: Optional[str] = None
    """a run folder to continue from its last checkpoint, in the same folder, with the same settings"""
    save_every: Optional[int] = None
    """save a checkpoint (weights, optimizer, step, random states) every this many steps; None = every eval"""
    track: bool = False
    """log to Weights & Biases (needs `pip install wandb`)"""
    wandb_project: str = "paint-post-training"
    """the W&B project of --track"""
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
    # device
    device: str = "auto"
    """cuda if present, else cpu"""
    dtype: str = "auto"
    """compute dtype: bfloat16 autocast on cuda, float32 on cpu (trained weights, Adam state: float32)"""
    gradient_checkpointing: bool = False
    """recompute each layer's activations in backward instead of keeping them: less memory, ~30% more time"""
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
    learning_rate: float = 5e-3
    """peak learning rate (from scratch; use ~1e-5 to fine-tune a pretrained model)"""
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


# ALGO: the completion-only negative log-likelihood (InstructGPT §3.5; the prompt is never a target)
def completion_nll(
    logits: torch.Tensor, completion_ids: torch.Tensor, completion_mask: torch.Tensor
) -> torch.Tensor:
    """Sum over completion tokens (EOS included) of -log p(token | everything before it), from the logits
    (B, T, V) that predict each completion token (common.completion_forward makes the one-token shift)."""
    return -(token_logprobs(logits, completion_ids) * completion_mask).sum()


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, min_ratio: float) -> float:
    """Linear warm-up to peak, then cosine decay to peak * min_ratio (SGDR, Loshchilov & Hutter 2017, Eq. 5,
    without restarts; nanoGPT's get_lr)."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def main(args: Args) -> dict:
    args = resumed_args("sft", args) if args.resume else args  # --resume: the run's own settings
    rank, world = init_distributed(args.device)  # DDP: a world of one without torchrun (common/run.py)
    log = Logger("sft", args, rank)  # the run folder, metrics.jsonl, the console; only rank 0 writes
    # DDP: the same seed on every rank: the same initial weights and batches, of which each takes its share
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    if args.batch_size % (world * args.grad_accum_steps):
        raise ValueError(
            f"--batch-size {args.batch_size} is not divisible by --grad-accum-steps "
            f"{args.grad_accum_steps}" + (f" x {world} processes" if world > 1 else "")
        )

    # 1. data: the user's JSONL rows, or the built-in colour names (sampled fresh every step)
    rows, eval_prompts_ = None, eval_prompts(args.eval_size)
    if args.data is not None:
        rows = [(r["prompt"], r["completion"]) for r in read_jsonl(args.data, ("prompt", "completion"))]
        if args.eval_data is not None:
            held_out = [
                (r["prompt"], r["completion"]) for r in read_jsonl(args.eval_data, ("prompt", "completion"))
            ]
        else:  # NOTE: held out by a hash of the prompt, so that no prompt is both trained on and evaluated
            rows, held_out = split_by_prompt(rows, prompt_of=lambda row: row[0])
        eval_prompts_ = list(dict.fromkeys(p for p, _ in held_out))[: args.eval_size]
    judge = get_judge(args.judge, args.device, eval_prompts_)

    # 2. model: a pretrained one, or the painter's recipe (a tokenizer of the data's words, a small Llama);
    # fp32 weights either way, the forward in bf16 under autocast when --dtype says so
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    if args.model is None:
        tokenizer = build_tokenizer(args.tokenizer, painter_texts(rows), min_count=2 if rows is None else 1)
        model = new_model(tokenizer, args.d_model, args.n_layers, args.n_heads, args.d_ff).to(device)
    else:
        model, tokenizer = load_model_and_tokenizer(args.model, args.device)
    context = model.config.max_position_embeddings
    if rows is not None:
        examples = encode_examples(tokenizer, rows, context)  # (prompt_ids, completion_ids + end token)
    else:
        names, plain_names = trainable_names(tokenizer, context)  # the painter's labels, none with <unk>
    if rank == 0:
        print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, vocab {len(tokenizer)}")
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    # eval/kl's starting policy: for rank 0's eval, a copy in host memory
    start_model = frozen_copy(model, dtype, "cpu") if log.active else None
    ddp_model = DDP(model) if world > 1 else model  # DDP: averages the gradients in backward

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
        return evaluate(
            model, tokenizer, judge, eval_prompts_, args.temperature, args.max_new_tokens, dtype, start_model
        )

    # --resume: weights, optimizer, random states and step of the run's last checkpoint (common/checkpoint.py)
    start, state = load_checkpoint(log, {"model": model}, optimizer, rng) if args.resume else (1, {})
    # rank 0: the starting model
    eval_metrics = log.evaluate(0, run_eval, model, tokenizer) if start == 1 else {}
    order, cursor = None, 0  # with --data: the order of the rows and the position in it
    if rows is not None:
        order, cursor = (
            (rng.permutation(len(rows)), 0) if start == 1 else (np.array(state["order"]), state["cursor"])
        )
    model.train()
    for step in range(start, args.total_steps + 1):
        t0 = time.perf_counter()
        # 3. one optimiser batch of B (prompt_ids, completion_ids) pairs
        if rows is None:
            pairs = sample_colour_pairs(
                rng, args.batch_size, args.synthetic_frac, args.jitter, names, plain_names
            )
            batch = encode_examples(tokenizer, pairs, context)
        else:
            if cursor + args.batch_size > len(order):
                order, cursor = np.concatenate([order[cursor:], rng.permutation(len(rows))]), 0
            batch = [examples[i] for i in order[cursor : cursor + args.batch_size]]
            cursor += args.batch_size

        # 4. gradient of the loss over the whole batch, accumulated over micro-batches
        # NOTE: the token count is taken before the micro-batches run: one normaliser for all of them
        n_tokens = sum(len(c) for _, c in batch)
        # DDP: this rank's share of the batch; the gradients are AVERAGED over ranks, so each rank divides its
        # sum by n_tokens / world: then k processes with B/k rows give the gradient of one process with B rows
        share = args.batch_size // world
        batch = batch[rank * share : (rank + 1) * share]
        n_tokens = n_tokens / world
        micro = share // args.grad_accum_steps
        loss_sum = 0.0
        for start in range(0, share, micro):
            micro_batch = collate(batch[start : start + micro], tokenizer.pad_token_id)
            prompt_ids, prompt_mask, completion_ids, completion_mask = (t.to(device) for t in micro_batch)
            with sync_gradients(ddp_model, sync=start + micro >= share):  # DDP: all-reduce in the last one
                with autocast(device, dtype):  # the forward in bf16 (or fp32); the loss below in fp32
                    # (B/k, T, V): the lm head only where a completion token is predicted
                    logits = completion_forward(
                        ddp_model, prompt_ids, prompt_mask, completion_ids, completion_mask
                    )
                loss = completion_nll(logits, completion_ids, completion_mask) / n_tokens
                loss.backward()
            loss_sum += loss.detach()
        if not torch.isfinite(loss_sum):
            raise FloatingPointError(
                f"loss is {float(loss_sum)} at step {step}; the last good model is in "
                f"{log.dir}/model: lower --learning-rate or check the data"
            )

        # 5. clip, schedule, step
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        lr = lr_at(step - 1, args.total_steps, args.warmup_steps, args.learning_rate, args.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_s = time.perf_counter() - t0

        # 6. log (DDP: summed over ranks, so the metrics are the whole batch's), eval, save
        if step % args.log_every == 0:
            batch_tokens = sum(len(p) + len(c) for p, c in batch)
            loss_all, tokens_all = all_sum(torch.tensor([float(loss_sum), batch_tokens])).tolist()
            log.log(
                step,
                {
                    "train/loss": loss_all / world,
                    "train/grad_norm": float(grad_norm),
                    "train/lr": lr,
                    "perf/step_s": step_s,
                    "perf/tokens_per_s": tokens_all / step_s,
                },
            )
        if step % args.eval_every == 0 or step == args.total_steps:
            eval_metrics = log.evaluate(step, run_eval, model, tokenizer)
        if step % (args.save_every or args.eval_every) == 0 or step == args.total_steps:
            data_order = {"order": order.tolist(), "cursor": cursor} if rows is not None else {}
            save_checkpoint(log, step, {"model": model}, optimizer, rng, **data_order)
    if args.save_to and rank == 0:
        save_atomic(model, tokenizer, args.save_to)
    del ddp_model  # DDP: free the wrapper before leaving the process group
    cleanup_distributed()
    log.close()
    return {"train/loss": float(loss_sum), **eval_metrics, "run_dir": log.dir}


if __name__ == "__main__":
    main(parse_args(Args, __doc__))
