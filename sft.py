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
Shapes: B batch, L prompt + completion tokens (right padded), V vocab.
Run: python sft.py                                   # a new painter, ~8 min on 2 CPU cores
     python sft.py --model Qwen/Qwen2.5-0.5B-Instruct --data pairs.jsonl --learning-rate 1e-5
"""
import contextlib
import json
import math
import os
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Literal, Optional

import numpy as np
import torch
import torch.distributed as dist
import tyro
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from common import (PROMPT, autocast, color_names, encode_completion, encode_prompt, eval_prompts, evaluate, get_judge,
                    load_model_and_tokenizer, read_jsonl, resolve_device_dtype, sample_colour_pairs, save_atomic,
                    xkcd_names)


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
    track: bool = False
    """log to Weights & Biases (needs `pip install wandb`)"""
    # model
    model: Optional[str] = None
    """HF causal LM to fine-tune (folder or hub id); None builds a new painter from scratch"""
    tokenizer: Literal["word", "bpe", "byte"] = "word"
    """from scratch only: word-level over the data's words, byte-level BPE (1024), or raw bytes"""
    d_model: int = 128
    """from scratch only: hidden size"""
    n_layers: int = 4
    """from scratch only: transformer blocks"""
    n_heads: int = 4
    """from scratch only: attention heads"""
    d_ff: int = 384
    """from scratch only: MLP hidden size"""
    device: str = "auto"
    """cuda if present, else cpu"""
    dtype: str = "auto"
    """compute dtype: bfloat16 autocast on cuda, float32 on cpu (trained weights and Adam state stay float32)"""
    gradient_checkpointing: bool = False
    """recompute each layer's activations in backward instead of keeping them: less memory, ~30% more time"""
    # data
    data: Optional[str] = None
    """JSONL file of {"prompt", "completion"} rows; None = the built-in colour names"""
    synthetic_frac: float = 0.5
    """built-in data: share of each batch that is random colours named by their nearest xkcd colour"""
    jitter: int = 8
    """built-in data: each name's hex moves by up to +-jitter per RGB channel"""
    # optimisation
    total_steps: int = 4000
    """optimiser steps"""
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
    max_new_tokens: int = 16
    """longest sampled completion in the eval"""


HEX_DIGIT = Regex("(?<=#|#[0-9a-fA-F]|#[0-9a-fA-F]{2}|#[0-9a-fA-F]{3}|#[0-9a-fA-F]{4}|#[0-9a-fA-F]{5})[0-9a-fA-F]")


def build_tokenizer(kind: str, texts: list[str], vocab_size: int = 1024, min_count: int = 2) -> PreTrainedTokenizerFast:
    """A tokenizer trained offline on the data: "word" = one token per whitespace-separated word seen
    at least min_count times; "bpe" / "byte" = byte-level BPE with vocab_size / no merges. The six hex
    digits after '#' are always single tokens, so every colour is spelt the same way."""
    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    split_hex = [pre_tokenizers.Split(HEX_DIGIT, "isolated"), pre_tokenizers.Split("#", "isolated")]
    if kind == "word":
        pre = pre_tokenizers.Sequence(split_hex + [pre_tokenizers.WhitespaceSplit()])
        counts = Counter(w for t in texts for w, _ in pre.pre_tokenize_str(t))
        vocab = specials + sorted(w for w, n in counts.items() if n >= min_count)
        tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
        tokenizer.pre_tokenizer, tokenizer.decoder = pre, decoders.WordPiece()  # decoding joins words with spaces
    else:
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(split_hex + [pre_tokenizers.ByteLevel(add_prefix_space=False)])
        tokenizer.decoder = decoders.ByteLevel()
        size = vocab_size if kind == "bpe" else len(specials) + 256
        trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tokenizer.train_from_iterator(texts, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>", padding_side="left")


def new_model(tokenizer, d_model: int, n_layers: int, n_heads: int, d_ff: int, context: int = 64) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=d_model, intermediate_size=d_ff,
                         num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_heads,
                         max_position_embeddings=context, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config)


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """(prompt_ids, completion_ids) pairs -> right-padded input_ids, attention_mask, completion_mask (B, L).

    NOTE: completion_mask is built from lengths, never by comparing with pad_id, so when pad == EOS the
    final EOS is still trained."""
    width = max(len(p) + len(c) for p, c in examples)
    input_ids = torch.full((len(examples), width), pad_id)
    attention_mask = torch.zeros(len(examples), width, dtype=torch.long)
    completion_mask = torch.zeros(len(examples), width)
    for i, (p, c) in enumerate(examples):
        input_ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        attention_mask[i, : len(p) + len(c)] = 1
        completion_mask[i, len(p) : len(p) + len(c)] = 1
    return input_ids, attention_mask, completion_mask


LOGITS_PER_BLOCK = 1 << 24  # 64 MB of fp32 logits: the most token_logprobs copies at once


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token): (B, L, V), (B, L) -> (B, L) in fp32.
    NOTE: a block of rows at a time, recomputed in backward (checkpoint): log_softmax (or cross_entropy) over all of
    (B, L, V) in fp32 would copy the logits at 4 bytes each and keep the copy for backward, 20 GB at B=64, L=512,
    V=151,936 (TRL selective_log_softmax, PR #2773). One block holds at most LOGITS_PER_BLOCK fp32 logits."""
    def block_logprobs(block_logits, block_tokens):
        logp = torch.log_softmax(block_logits.float(), dim=-1)
        return logp.gather(-1, block_tokens.unsqueeze(-1)).squeeze(-1)
    rows = max(1, LOGITS_PER_BLOCK // max(1, logits.shape[1] * logits.shape[2]))
    blocks = zip(logits.split(rows), tokens.split(rows))
    return torch.cat([checkpoint(block_logprobs, lg, tk, use_reentrant=False) for lg, tk in blocks])


def completion_nll(logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Sum over completion tokens (EOS included) of -log p(token | everything before it)."""
    # NOTE: the one-token shift: logits at position t predict the token at t + 1
    nll = -token_logprobs(logits[:, :-1], input_ids[:, 1:])                   # (B, L-1)
    return (nll * completion_mask[:, 1:]).sum()


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, min_ratio: float) -> float:
    """Linear warm-up to peak, then cosine decay to peak * min_ratio (SGDR, Loshchilov & Hutter 2017, Eq. 5,
    without restarts; nanoGPT's get_lr)."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def encode_rows(tokenizer, rows: list[tuple[str, str]], context: int) -> list[tuple[list[int], list[int]]]:
    examples = [(encode_prompt(tokenizer, p), encode_completion(tokenizer, p, c)) for p, c in rows]
    for (p, c), (prompt, _) in zip(examples, rows):
        if len(p) + len(c) > context:
            raise ValueError(f"prompt + completion of {len(p) + len(c)} tokens exceeds the model's context of "
                             f"{context} ({prompt[:40]!r}...): shorten the data or use a longer-context model")
    return examples


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


def main(args: Args) -> dict:
    t_start, eval_s = time.perf_counter(), 0.0  # wall clock; perf/train_s leaves out the evals
    run_name = f"sft__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = os.path.join(args.output_dir, run_name)
    rank, world = init_distributed(args.device)
    if rank == 0:
        print(json.dumps(asdict(args)))
    # DDP: the same seed on every rank: the same initial weights and the same batches, of which each rank takes its share
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    if args.batch_size % (world * args.grad_accum_steps):
        raise ValueError(f"--batch-size {args.batch_size} is not divisible by --grad-accum-steps {args.grad_accum_steps}"
                         + (f" x {world} processes" if world > 1 else ""))

    # 1. data: the user's JSONL rows, or the built-in colour names (sampled fresh every step)
    rows = None
    if args.data is not None:
        rows = [(r["prompt"], r["completion"]) for r in read_jsonl(args.data, ("prompt", "completion"))]
    judge = get_judge(args.judge, args.device)
    prompts_for_eval = eval_prompts(args.eval_size) if rows is None else [p for p, _ in rows[: args.eval_size]]

    # 2. model: a pretrained one, or a new tokenizer + small Llama trained on the data's own words; fp32 weights
    device, dtype = resolve_device_dtype(args.device, args.dtype)  # dtype: what autocast computes in
    if args.model is None:
        texts = [p for p, _ in rows] + [c for _, c in rows] if rows else (
            [PROMPT.format(hex="#" + d * 6) for d in "0123456789abcdef"] + [n for n, _ in color_names("train") + xkcd_names()])
        tokenizer = build_tokenizer(args.tokenizer, texts, min_count=2 if rows is None else 1)
        model = new_model(tokenizer, args.d_model, args.n_layers, args.n_heads, args.d_ff)
        model.to(device)
    else:
        model, tokenizer = load_model_and_tokenizer(args.model, args.device)
    context = model.config.max_position_embeddings
    if rows is not None:
        examples = encode_rows(tokenizer, rows, context)
    else:  # NOTE: leave out names with words the tokenizer lacks (they would teach the model to say <unk>)
        prompt = PROMPT.format(hex="#000000")
        room = context - len(encode_prompt(tokenizer, prompt))  # and names too long to fit
        names = tuple((n, h) for n, h in color_names("train")
                      if len(ids := encode_completion(tokenizer, prompt, n)) <= room and tokenizer.unk_token_id not in ids)
    if rank == 0:
        print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, vocab {len(tokenizer)}")
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    # DDP: the wrapper all-reduces (averages) the gradients in backward; eval and save use the bare model
    net = DDP(model) if world > 1 else model

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.learning_rate, betas=(0.9, 0.95))
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
        metrics, samples = evaluate(model, tokenizer, judge, prompts_for_eval, args.temperature, args.max_new_tokens,
                                    dtype=dtype)
        log({"step": step, **metrics, "perf/train_s": t_eval - t_start - eval_s}, samples)
        print("   " + " · ".join(f"{s['prompt'][-7:]} → {s['completion']}" for s in samples[:6]))
        save_atomic(model, tokenizer, os.path.join(run_dir, "model"))  # the last good checkpoint
        eval_s += time.perf_counter() - t_eval
        return metrics

    eval_metrics = run_eval(0) if rank == 0 else {}
    order, cursor = (rng.permutation(len(rows)), 0) if rows else (None, 0)
    model.train()
    for step in range(1, args.total_steps + 1):
        t0 = time.perf_counter()
        # 3. one optimiser batch of B (prompt_ids, completion_ids) pairs
        if rows is None:
            batch = encode_rows(tokenizer, sample_colour_pairs(rng, args.batch_size, args.synthetic_frac, args.jitter, names), context)
        else:
            if cursor + args.batch_size > len(order):
                order, cursor = np.concatenate([order[cursor:], rng.permutation(len(rows))]), 0
            batch, cursor = [examples[i] for i in order[cursor : cursor + args.batch_size]], cursor + args.batch_size
        # 4. gradient of the loss over the whole batch, accumulated over micro-batches
        n_tokens = sum(len(c) for _, c in batch)  # NOTE: counted before the micro-batches: one normaliser for all
        # DDP: this rank's share of the batch; the gradients are AVERAGED over ranks, so each rank divides its
        # sum by n_tokens / world: then k processes with B/k rows give the gradient of one process with B rows
        share = args.batch_size // world
        batch, n_tokens = batch[rank * share : (rank + 1) * share], n_tokens / world
        micro = share // args.grad_accum_steps
        loss_sum = 0.0
        for start in range(0, share, micro):
            # DDP: all-reduce the gradients once, in the last micro-batch's backward
            with net.no_sync() if world > 1 and start + micro < share else contextlib.nullcontext():
                input_ids, attention_mask, completion_mask = (t.to(model.device) for t in collate(batch[start : start + micro], tokenizer.pad_token_id))
                with autocast(device, dtype):  # the forward in bf16 (or fp32); the loss below in fp32
                    logits = net(input_ids, attention_mask=attention_mask, use_cache=False).logits  # (B/k, L, V)
                loss = completion_nll(logits, input_ids, completion_mask) / n_tokens
                loss.backward()
            loss_sum += loss.detach()
        if not torch.isfinite(loss_sum):
            raise FloatingPointError(f"loss is {float(loss_sum)} at step {step}; the last good model is in "
                                     f"{run_dir}/model: lower --learning-rate or check the data")
        # 5. clip, schedule, step
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step - 1, args.total_steps, args.warmup_steps, args.learning_rate, args.min_lr_ratio)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_s = time.perf_counter() - t0
        # 6. log (DDP: summed over ranks, so the metrics are the whole batch's), eval, save
        if step % args.log_every == 0:
            sums = all_sum(torch.tensor([float(loss_sum), sum(len(p) + len(c) for p, c in batch)]))
            log({"step": step, "train/loss": float(sums[0]) / world, "train/grad_norm": float(grad_norm),
                 "train/lr": optimizer.param_groups[0]["lr"], "perf/step_s": step_s,
                 "perf/tokens_per_s": float(sums[1]) / step_s})
        if rank == 0 and (step % args.eval_every == 0 or step == args.total_steps):
            eval_metrics = run_eval(step)
    if args.save_to and rank == 0:
        save_atomic(model, tokenizer, args.save_to)
    if world > 1:  # DDP: free the wrapper first: if its reducer held the group last, freeing it could deadlock
        del net
        dist.barrier()  # wait for rank 0's last eval and save, then leave together
        dist.destroy_process_group()
    return {"train/loss": float(loss_sum), **eval_metrics, "run_dir": run_dir}


if __name__ == "__main__":
    try:
        main(tyro.cli(Args, description=__doc__))
    except (ValueError, OSError, FloatingPointError) as e:
        sys.exit(f"sft.py: error: {e}")
