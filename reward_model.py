"""Reward model — a Bradley–Terry scalar reward learnt from preference pairs (Stiennon et al. 2020, §3.4;
InstructGPT, Ouyang et al. 2022, §3.5 and Eq. 1).

A scalar head r_phi on the policy's backbone reads the hidden state of the last real token of prompt x +
completion y (+ EOS). Under the Bradley–Terry model P(y_c > y_r | x) = sigma(r(x, y_c) - r(x, y_r)), so for
pairs (x, y_c chosen, y_r rejected) we minimise the negative log-likelihood of the preferences:
    L = -mean log sigma(r_c - r_r - m)  +  c * mean((r_c + r_r)^2)
with an optional margin m (Llama 2, Touvron et al. 2023, Eq. 2, there per pair; here one constant) and the
reward-centering term of weight c (Eisenstein et al. 2023; TRL's center_rewards_coefficient), which pins the
free offset of r near 0 so that rewards are comparable across runs.
SFD = summarize_from_feedback_details (Huang et al.), the code of "The N Implementation Details of RLHF with
PPO" (Huang et al. 2024, arXiv:2403.17031; "N-blog" below, with its detail numbers).
Differences from the papers: (1) pairs, not InstructGPT's K-way comparisons (K choose 2 pairs in one batch);
(2) the pairs are labelled by a judge (AI feedback) instead of people, optionally with flipped labels
(--flip-prob) to imitate noisy raters; (3) no post-hoc gain/bias normalisation (SFD stores a bias; use
--center-coef instead); (4) the head is a bias-free Linear(d, 1) initialised N(0, 1/sqrt(d+1)) as in SFD.
The saved model is an AutoModelForSequenceClassification with num_labels=1: `--judge rm:PATH` in every
script (and ppo_rlhf.py --reward-model PATH) scores with it exactly as score_last_token below does.
Shapes: B pairs, P prompt tokens (left padded), T completion tokens (right padded), D hidden size.
# poet-labelled pairs from the painter, ~2-3 min on 2 CPU cores
Run: python reward_model.py
     python reward_model.py --judge correct --data my_pairs.jsonl
"""

import time
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
import tyro

from common.models import forward_sharing_prompts, load_model_and_tokenizer  # the model
from common.task import get_judge, load_pairs  # the task: preference pairs and the judge that ranks them
from common.run import Run  # the run: process group, seeds, run folder, logging, checkpoints, resume


@dataclass
class Args(Run.Args):  # and the run's settings (folders, resume, device, LoRA, FSDP: common/run.py)
    # run
    seed: int = 1
    """seed for python, numpy and torch (data order, head init, the built-in pairs)"""
    # model
    model: Optional[str] = None
    """HF model whose backbone gets the scalar head (folder or hub id); None = the shipped painter"""
    # data
    data: Optional[str] = None
    """JSONL of {prompt, chosen, rejected} (or full texts {chosen, rejected}); None = judge-ranked pairs"""
    eval_data: Optional[str] = None
    """JSONL of held-out pairs; None = built-in held-out pairs (with --data: the last 10% of its rows)"""
    judge: str = "poet"
    """built-in pairs: the judge that ranks the names (plays the human rater)"""
    num_prompts: int = 4096
    """built-in pairs: training prompts (at most one pair each: the judge's best vs worst name)"""
    names_per_prompt: int = 4
    """built-in pairs: names ranked per prompt"""
    source: Literal["policy", "names"] = "policy"
    """built-in pairs: names sampled from the model, or random names from the colour data"""
    flip_prob: float = 0.0
    """built-in pairs: probability of swapping chosen and rejected (label noise)"""
    eval_prompts: int = 512
    """built-in held-out pairs: prompts (held-out hexes, never flipped)"""
    identical_pairs: Literal["skip", "error"] = "skip"
    """pairs whose chosen equals rejected: skip and count them, or stop with an error"""
    too_long: Literal["truncate", "error"] = "truncate"
    """pairs longer than the context: truncate the completions (counted) or stop with an error"""
    # algorithm
    margin: float = 0.0
    """m: the loss is -log sigma(r_c - r_r - m) (Llama 2 Eq. 2)"""
    center_coef: float = 0.01
    """c: weight of the centering term c * mean((r_c + r_r)^2) (TRL recommends 0.01; 0 = off)"""
    # optimisation
    num_epochs: int = 2
    """passes over the training pairs"""
    batch_size: int = 64
    """pairs per optimiser step (2B sequences in one forward)"""
    learning_rate: Optional[float] = None
    """peak learning rate, linearly decayed to 0 (SFD / N-blog: anneal to zero); None = 1e-3 for the painter,
    1e-5 for a --model (OpenRLHF's 9e-6; TRL's 1e-4 is high for a full fine-tune)"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """clip the global gradient norm to this"""
    # eval and logging
    eval_every: int = 50
    """evaluate (and save) every this many steps, and at the start and end"""
    log_every: int = 10
    """print and log train metrics every this many steps"""


def concat_pairs(
    batch: list[tuple[list[int], list[int], list[int]]], pad_id: int
) -> tuple[torch.Tensor, ...]:
    """B (prompt, chosen, rejected) -> prompt_ids, prompt_mask (B, P), left padded, and completion_ids,
    completion_mask (2B, T), right padded: rows 2i and 2i+1 are pair i's chosen and rejected, which follow
    its prompt, so one forward scores both and runs the prompt once.

    NOTE: the masks come from lengths, never from comparing with pad_id, so an EOS equal to pad still
    counts."""
    P, T = max(len(p) for p, _, _ in batch), max(len(y) for _, c, r in batch for y in (c, r))
    prompt_ids = torch.full((len(batch), P), pad_id)
    prompt_mask = torch.zeros(len(batch), P, dtype=torch.long)
    completion_ids = torch.full((2 * len(batch), T), pad_id)
    completion_mask = torch.zeros(2 * len(batch), T)
    for i, (p, c, r) in enumerate(batch):
        prompt_ids[i, P - len(p) :], prompt_mask[i, P - len(p) :] = torch.tensor(p), 1
        for row, y in ((2 * i, c), (2 * i + 1, r)):
            completion_ids[row, : len(y)], completion_mask[row, : len(y)] = torch.tensor(y), 1
    return prompt_ids, prompt_mask, completion_ids, completion_mask


def score_last_token(model, prompt_ids, prompt_mask, completion_ids, completion_mask) -> torch.Tensor:
    """r(x, y) of each completion, (N,): the scalar head on the hidden state of its last real token, for b
    prompts (b, P), left padded, each followed by N/b of the completions (N, T), right padded."""
    P, r = prompt_ids.shape[1], len(completion_ids) // len(prompt_ids)
    input_ids = torch.cat([prompt_ids.repeat_interleave(r, 0), completion_ids], dim=1)  # (N, P+T)
    attention_mask = torch.cat([prompt_mask.repeat_interleave(r, 0), completion_mask.long()], dim=1)
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)  # NOTE: left padding: real tokens start at 0
    # = model(..., output_hidden_states=True).hidden_states[-1][:, P:], each prompt run once (tested equal);
    # NOTE: the model's own forward, not model.base_model, so that a DDP wrapper syncs the gradients
    inputs = (input_ids, attention_mask, position_ids)
    hidden = forward_sharing_prompts(model, *inputs, prompt_length=P, repeats=r, hidden=True)  # (N, T, D)
    # NOTE: the last real token found from the mask, not from pad_token_id (TRL #937: when pad == EOS, HF's
    # own lookup reads the wrong token)
    last = (completion_mask * torch.arange(completion_mask.shape[1], device=completion_mask.device)).argmax(1)
    head = getattr(model, "module", model).score  # DDP: the wrapped model's head
    return head(hidden[torch.arange(len(last), device=last.device), last]).squeeze(-1).float()


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: float = 0.0,
    center_coef: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and accuracy of B pairs of rewards (B,) each."""
    # ALGO: the Bradley–Terry negative log-likelihood (InstructGPT Eq. 1; DPO paper Eq. 2), with a margin
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards - margin).mean()
    # ALGO: reward centering (Eisenstein et al. 2023): the BT loss only sees differences; pin the mean near 0
    if center_coef:
        loss = loss + center_coef * ((chosen_rewards + rejected_rewards) ** 2).mean()
    accuracy = (chosen_rewards > rejected_rewards).float().mean()  # NOTE: a tie counts as wrong
    return loss, accuracy


@torch.no_grad()
def evaluate_pairs(
    model, pairs: list, pad_id: int, dtype: torch.dtype = torch.float32, batch_size: int = 256
) -> dict:
    """eval/accuracy (share of held-out pairs ranked as the labeller ranked them), eval/loss, eval/margin."""
    chosen, rejected = [], []
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start : start + batch_size]
        tensors = (t.to(model.device) for t in concat_pairs(batch, pad_id))
        with torch.autocast(model.device.type, dtype=dtype, enabled=dtype != torch.float32):
            rewards = score_last_token(model, *tensors).view(-1, 2)  # (B, 2): chosen, rejected
        chosen.append(rewards[:, 0])
        rejected.append(rewards[:, 1])
    chosen, rejected = torch.cat(chosen), torch.cat(rejected)
    loss, accuracy = bradley_terry_loss(chosen, rejected)
    return {
        "eval/accuracy": float(accuracy),
        "eval/loss": float(loss),
        "eval/margin": float((chosen - rejected).mean()),
        "eval/reward_mean": float(torch.cat([chosen, rejected]).mean()),
    }


def main(args: Args) -> dict:
    # DDP: the same seed on every rank: the same head, pairs and batch order, of which each rank takes a share
    run = Run("reward_model", args, learning_rate=(1e-3, 1e-5))
    args = run.args  # --resume: the run's own settings
    if args.batch_size % run.world:
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by the {run.world} processes")

    # 1. the backbone with a scalar head (dropout off, fp32 weights); a causal-LM checkpoint gets a new head
    model, tokenizer = load_model_and_tokenizer(args.model, run.load_device, scalar_head=True)  # FSDP: host
    if not any(a.endswith("ForSequenceClassification") for a in model.config.architectures or []):
        # NOTE: N(0, 1/sqrt(d+1)) as in SFD reward.py and OpenAI's lm-human-preferences (N-blog detail 6)
        torch.nn.init.normal_(model.score.weight, std=1 / np.sqrt(model.config.hidden_size + 1))
    model = run.lora(model)  # LoRA: adapters and the head train, the base frozen (common/lora.py)
    context = getattr(model.config, "max_position_embeddings", None) or 1 << 30

    # 2. preference pairs, encoded: (prompt_ids, chosen_ids, rejected_ids), both completions ending in EOS;
    # without --data the paint task's: names sampled from the same checkpoint as a causal LM (not trained, so
    # its weights may be bf16) or random names, ranked by the judge
    paint = {}
    if args.data is None:
        policy = args.source == "policy"
        sampler = load_model_and_tokenizer(args.model, args.device, args.dtype) if policy else None
        paint = dict(judge=get_judge(args.judge, args.device), sampler=sampler, num_prompts=args.num_prompts,
                     eval_pairs=args.eval_prompts, names_per_prompt=args.names_per_prompt, source=args.source,
                     flip_prob=args.flip_prob, seed=args.seed, dtype=run.dtype)  # fmt: skip
    train, heldout, _ = load_pairs(
        args.data, args.eval_data, tokenizer, context, args.identical_pairs, args.too_long,
        save_to=run.dir if run.active else None, quiet=not run.active, **paint,
    )  # fmt: skip
    steps_per_epoch = max(1, len(train) // args.batch_size)
    total_steps = steps_per_epoch * args.num_epochs
    if run.active:
        print(f"{len(train)} training pairs, {len(heldout)} held-out pairs, {total_steps} steps")
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    ddp_model = run.wrap(model)  # DDP: averages the gradients in backward
    # NOTE: fused: one kernel for all the parameters, not a loop over them (TRL's default adamw_torch_fused)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay, fused=True
    )

    def run_eval() -> tuple[dict, None]:
        return evaluate_pairs(model, heldout, tokenizer.pad_token_id, run.dtype), None

    # --resume: the last checkpoint's weights, optimizer, random states and step; else the eval of step 0
    start, state = run.begin({"model": model}, optimizer, tokenizer, run_eval)
    order = state.get("order")  # this epoch's order of the pairs
    model.train()
    for step in range(start, total_steps + 1):
        epoch, position = divmod(step - 1, steps_per_epoch)
        if position == 0:  # a new epoch, a new order
            order = run.rng.permutation(len(train))
        t0 = time.perf_counter()
        # 3. one forward over the B prompts and 2B completions: each prompt once, then its chosen and rejected
        batch = [train[i] for i in order[position * args.batch_size : (position + 1) * args.batch_size]]
        # DDP: this rank's share; equal shares, so the mean of the ranks' mean losses is the whole batch's
        share = args.batch_size // run.world
        batch = batch[run.rank * share : (run.rank + 1) * share]
        tensors = [t.to(run.device) for t in concat_pairs(batch, tokenizer.pad_token_id)]
        with run.autocast():  # the forward in bf16 (or fp32); the loss below in fp32
            rewards = score_last_token(ddp_model, *tensors).view(-1, 2)  # (B, 2): chosen, rejected
        chosen_rewards, rejected_rewards = rewards[:, 0], rewards[:, 1]

        # 4. the Bradley–Terry loss
        loss, accuracy = bradley_terry_loss(
            chosen_rewards=chosen_rewards,
            rejected_rewards=rejected_rewards,
            margin=args.margin,
            center_coef=args.center_coef,
        )
        run.check_finite(loss, step, "loss", "lower --learning-rate or check the data")

        # 5. clip, linear decay to 0, step
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        lr = args.learning_rate * (1 - (step - 1) / total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_s = time.perf_counter() - t0

        # 6. log (averaged over the ranks), evaluate and save on schedule
        metrics = {
            "epoch": epoch,
            "train/loss": loss.detach(),
            "train/accuracy": accuracy,
            "train/margin": (chosen_rewards - rejected_rewards).detach().mean(),
            "train/reward_mean": rewards.detach().mean(),
            "train/grad_norm": grad_norm,
            "train/lr": lr,
            "perf/step_s": step_s,
            "perf/tokens_per_s": (tensors[1].sum() + tensors[3].sum()) / step_s,  # prompts, completions
        }
        run.end_step(step, total_steps, metrics if step % args.log_every == 0 else None, order=order)
    return {"train/loss": float(loss.detach()), "train/accuracy": float(accuracy), **run.close()}


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
