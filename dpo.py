"""DPO — Direct Preference Optimization (Rafailov et al. 2023, arXiv:2305.18290); IPO, hinge, cDPO and RPO.

For pairs (x, y_c chosen, y_r rejected), with log pi(y|x) the SUM of the completion's token log-probs (EOS
included) and pi_ref the frozen starting policy, the implicit reward is (DPO Eq. 5, without beta log Z(x))
    r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x))
and, with Delta = [log pi(y_c) - log pi_ref(y_c)] - [log pi(y_r) - log pi_ref(y_r)], we minimise
    sigmoid  -(1-eps) log sigma(beta Delta) - eps log sigma(-beta Delta)   DPO Eq. 7; cDPO if eps > 0
    ipo      (Delta_bar - 1/(2 beta))^2, Delta_bar with each log-ratio divided by its completion's length
             (Azar et al. 2023, arXiv:2310.12036, its sampled loss; TRL normalises the same way)
    hinge    max(0, 1 - beta Delta)                      RSO (Liu et al. 2023, arXiv:2309.06657), SLiC's hinge
  + alpha * NLL(y_c) / |y_c|      optional, RPO (Pang et al. 2024, arXiv:2404.19733)
This is the Bradley–Terry loss of reward_model.py with r_phi replaced by the policy's own implicit reward:
no reward model, no sampling during training.
Differences from the paper: (1) the pairs are ranked by a judge (AI feedback) among names sampled from the
starting policy (on-policy pairs, as the paper's "preferred-FT" data), not by people; (2) pi_ref is the
starting checkpoint itself (the paper first runs SFT on the chosen answers; the painter is already SFT'd);
(3) rewards/* always use summed log-probs, also for IPO; (4) by default + the chosen's NLL (RPO, alpha 1):
without it both names' log-probs fall, and on the painter the names lose their stop token (README).
Shapes: B pairs, P prompt tokens (left padded), T completion tokens (right padded), V vocab.
Run: python dpo.py                    (the painter's names, ranked by poet+correct, ~1.5 min on 2 CPUs)
     python dpo.py --rpo-alpha 0       (DPO as in the paper)
     python dpo.py --loss-type ipo --beta 0.5 --judge architect
     python dpo.py --data my_pairs.jsonl --precompute-ref-logps
"""

import time
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
import tyro
from torch.utils.checkpoint import checkpoint

from common.models import forward_sharing_prompts, load_model_and_tokenizer  # the model
from common.task import evaluate, get_judge, load_pairs  # the task: preference pairs, the judge, the eval
from common.run import Run  # the run: process group, seeds, run folder, logging, checkpoints, resume


@dataclass
class Args(Run.Args):  # and the run's settings (folders, resume, device, LoRA, FSDP: common/run.py)
    # run
    seed: int = 1
    """seed for python, numpy and torch (data order, the built-in pairs, sampling)"""
    # model
    model: Optional[str] = None
    """HF causal LM to train, and its frozen copy pi_ref (folder or hub id); None = the shipped painter"""
    # data
    data: Optional[str] = None
    """JSONL of {prompt, chosen, rejected} (or full texts {chosen, rejected}); None = judge-ranked pairs"""
    eval_data: Optional[str] = None
    """JSONL of held-out pairs; None = built-in held-out pairs (with --data: the last 10% of its rows)"""
    judge: str = "poet+correct"
    """the judge that ranks the built-in pairs, and eval/reward (poet alone: the pairs' accuracy rises while
    the names drift from their colours, README)"""
    num_prompts: int = 2048
    """built-in pairs: training prompts (at most one pair each: the judge's best vs worst name)"""
    names_per_prompt: int = 4
    """built-in pairs: names sampled from the starting policy and ranked per prompt"""
    flip_prob: float = 0.0
    """built-in pairs: probability of swapping chosen and rejected (label noise; cDPO's eps models it)"""
    eval_pairs: int = 256
    """built-in held-out pairs: prompts (held-out hexes, never flipped)"""
    identical_pairs: Literal["skip", "error"] = "skip"
    """pairs whose chosen equals rejected: skip and count them, or stop with an error"""
    too_long: Literal["truncate", "error"] = "truncate"
    """pairs longer than the context: truncate the completions (counted) or stop with an error"""
    # algorithm
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    """sigmoid = DPO (cDPO with --label-smoothing), ipo = IPO (length-normalised), hinge = RSO's hinge"""
    beta: float = 0.1
    """beta: strength of the implicit KL to pi_ref (IPO's tau)"""
    label_smoothing: float = 0.0
    """eps: cDPO's assumed probability that a label is flipped (sigmoid loss only)"""
    rpo_alpha: float = 1.0
    """alpha: weight of the NLL of the chosen completion per token (RPO); 0 = DPO as in the paper"""
    precompute_ref_logps: bool = False
    """compute pi_ref's log-probs for every pair once before training and free the reference model"""
    # optimisation
    num_epochs: int = 4
    """passes over the training pairs"""
    batch_size: int = 32
    """pairs per optimiser step (2B sequences in one forward)"""
    learning_rate: Optional[float] = None
    """peak learning rate, linearly decayed to 0; None = 5e-4 for the painter (a tiny model takes a far
    larger rate), 1e-6 for a --model (TRL's DPO default)"""
    warmup_steps: int = 5
    """linear warm-up steps"""
    max_grad_norm: float = 1.0
    """clip the global gradient norm to this"""
    # eval and logging
    eval_every: int = 32
    """evaluate (and save) every this many steps, and at the start and end"""
    eval_size: int = 64
    """held-out prompts for the shared eval (sampled names scored by --judge)"""
    log_every: int = 16
    """print and log train metrics every this many steps"""
    temperature: float = 1.0
    """sampling temperature of the eval (and of the built-in pairs)"""
    max_new_tokens: int = 8
    """longest sampled name, in the built-in pairs and the eval (the RL scripts' default)"""


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


LOGITS_PER_BLOCK = 1 << 24  # 64 MB of fp32 logits: the most token_logprobs copies at once


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log pi(token): (2B, T, V), (2B, T) -> (2B, T) in fp32.
    NOTE: a block of rows at a time, recomputed in backward (checkpoint): log_softmax over all of (2B, T,
    V) in fp32 would copy the logits at 4 bytes each and keep the copy for backward, 20 GB at 2B=64, T=512,
    V=151,936 (TRL selective_log_softmax, PR #2773). One block holds at most LOGITS_PER_BLOCK fp32 logits."""

    def block_logprobs(block_logits, block_tokens):
        logp = torch.log_softmax(block_logits.float(), dim=-1)
        return logp.gather(-1, block_tokens.unsqueeze(-1)).squeeze(-1)

    rows = max(1, LOGITS_PER_BLOCK // max(1, logits.shape[1] * logits.shape[2]))
    blocks = zip(logits.split(rows), tokens.split(rows))
    return torch.cat([checkpoint(block_logprobs, lg, tk, use_reentrant=False) for lg, tk in blocks])


def completion_logits(model, prompt_ids, prompt_mask, completion_ids, completion_mask) -> torch.Tensor:
    """The logits (2B, T, V) that predict each completion token, for B prompts (B, P), left padded, each
    followed by its chosen and rejected completions (2B, T), right padded: rows 2i, 2i+1 follow prompt i."""
    P, r = prompt_ids.shape[1], len(completion_ids) // len(prompt_ids)
    input_ids = torch.cat([prompt_ids.repeat_interleave(r, 0), completion_ids], dim=1)  # (2B, P+T)
    attention_mask = torch.cat([prompt_mask.repeat_interleave(r, 0), completion_mask.long()], dim=1)
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)  # NOTE: left padding: real tokens start at 0
    # NOTE: the one-token shift: the logits at position j predict token j+1, so completion token t is
    # predicted at P-1+t, and the last token predicts nothing: it is not fed
    inputs = (input_ids[:, :-1], attention_mask[:, :-1], position_ids[:, :-1])
    # = model(*inputs).logits[:, P - 1 :], with each prompt run once for its pair (tested equal)
    return forward_sharing_prompts(model, *inputs, prompt_length=P, repeats=r)


def sequence_logprobs(
    logits: torch.Tensor, completion_ids: torch.Tensor, completion_mask: torch.Tensor
) -> torch.Tensor:
    """log pi(y | x) of each completion, (2B,): the SUM of its token log-probs (not padding), from the logits
    (2B, T, V) that predict each completion token (completion_logits makes the one-token shift)."""
    # NOTE: a sum, not a mean: averaging changes the objective (TRL #789; the mean is SimPO's)
    return (token_logprobs(logits, completion_ids) * completion_mask).sum(1)


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: Optional[torch.Tensor] = None,
    rejected_lengths: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean loss over B pairs, and the implicit rewards of chosen and rejected (B,) each (no gradient)."""
    chosen_logratios = chosen_logps - ref_chosen_logps  # (B,) log pi(y_c)/pi_ref(y_c)
    rejected_logratios = rejected_logps - ref_rejected_logps  # (B,)
    if loss_type == "sigmoid":
        # ALGO: DPO Eq. 7; with eps > 0 the expected loss under labels flipped with probability eps (cDPO)
        delta = chosen_logratios - rejected_logratios
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(
            -beta * delta
        )
    elif loss_type == "ipo":
        # ALGO: IPO regresses the per-token log-ratio gap onto 1/(2 tau); NOTE: length-normalised, as its
        # authors confirmed to TRL (dpo_trainer.py comment; without it the paper's numbers do not reproduce)
        delta = chosen_logratios / chosen_lengths - rejected_logratios / rejected_lengths
        losses = (delta - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        # ALGO: RSO's hinge (SLiC's, on the log-ratio margin): no gradient once beta * Delta > 1
        losses = torch.relu(1 - beta * (chosen_logratios - rejected_logratios))
    else:
        raise ValueError(f"unknown loss type {loss_type!r}: use sigmoid, ipo or hinge")
    # ALGO: the implicit rewards (DPO Eq. 5), logged as rewards/*
    chosen_rewards, rejected_rewards = beta * chosen_logratios.detach(), beta * rejected_logratios.detach()
    return losses.mean(), chosen_rewards, rejected_rewards


def batch_logprobs(model, batch: list, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs (B, 2) and completion lengths (B, 2), columns chosen and rejected: ONE
    forward over both, the prompt run once for the pair."""
    prompt_ids, prompt_mask, completion_ids, completion_mask = (
        t.to(model.device) for t in concat_pairs(batch, pad_id)
    )
    logits = completion_logits(model, prompt_ids, prompt_mask, completion_ids, completion_mask)  # (2B, T, V)
    logps = sequence_logprobs(logits, completion_ids, completion_mask)
    return logps.view(-1, 2), completion_mask.sum(1).view(-1, 2)


@torch.no_grad()
def all_logprobs(model, pairs: list, pad_id: int, batch_size: int) -> torch.Tensor:
    """(N, 2): log pi(y_c|x) and log pi(y_r|x) of every pair, batch_size pairs per forward (--batch-size: no
    more than a training step holds, so that a batch size lowered to fit memory fits here too)."""
    columns = []
    for start in range(0, len(pairs), batch_size):
        columns.append(batch_logprobs(model, pairs[start : start + batch_size], pad_id)[0])
    return torch.cat(columns)


def main(args: Args) -> dict:
    # DDP: the same seed on every rank: the same pairs and batch order, of which each rank takes its share
    run = Run("dpo", args, learning_rate=(5e-4, 1e-6))
    args = run.args  # --resume: the run's own settings
    if args.batch_size % run.world:
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by the {run.world} processes")
    if args.loss_type != "sigmoid" and args.label_smoothing:
        raise ValueError(
            f"--label-smoothing is cDPO's and applies to --loss-type sigmoid only, not {args.loss_type}"
        )

    # 1. the policy (fp32 master weights), its frozen reference (dropout off in both), the judge
    model, tokenizer = load_model_and_tokenizer(args.model, run.load_device)  # FSDP: on the host
    model = run.lora(model)  # LoRA: rank-R adapters, the base frozen (common/lora.py); else the model itself
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    # NOTE: the reference is an fp32 copy run under the same autocast: it computes exactly what the policy
    # computed at step 0 (a bf16 copy keeps norms and residuals in bf16: margins of rounding noise)
    # and, copied after the checkpointing flag, takes the policy's forward path (plain, not prompt-shared)
    ref_model = run.reference(model)  # LoRA: the policy with its adapters off (no copy); FSDP: sharded
    judge = get_judge(args.judge, args.device)
    context = getattr(model.config, "max_position_embeddings", None) or 1 << 30
    pad_id = tokenizer.pad_token_id

    # 2. preference pairs, encoded: (prompt_ids, chosen_ids, rejected_ids), both completions ending in EOS;
    # without --data the paint task's: names sampled from the starting policy, ranked by the judge
    paint = dict(judge=judge, sampler=(model, tokenizer), num_prompts=args.num_prompts,
                 eval_pairs=args.eval_pairs, names_per_prompt=args.names_per_prompt, flip_prob=args.flip_prob,
                 seed=args.seed, dtype=run.dtype, temperature=args.temperature,
                 max_new_tokens=args.max_new_tokens)  # fmt: skip
    train, heldout, eval_rows = load_pairs(
        args.data, args.eval_data, tokenizer, context, args.identical_pairs, args.too_long, args.eval_size,
        save_to=run.dir if run.active else None, quiet=not run.active, **paint,
    )  # fmt: skip
    with run.autocast():
        heldout_ref = all_logprobs(ref_model, heldout, pad_id, args.batch_size)  # (N_eval, 2), once
    ref_logps = None
    # NOTE: the same numbers as per batch; saves a forward per step and pi_ref's memory
    start_model = ref_model  # eval/kl's starting policy
    if args.precompute_ref_logps:
        with run.autocast():
            ref_logps, ref_model = all_logprobs(ref_model, train, pad_id, args.batch_size), None  # (N, 2)
        start_model = run.to_host(start_model)  # in host memory (LoRA's, FSDP's stay)
    steps_per_epoch = max(1, len(train) // args.batch_size)
    total_steps = steps_per_epoch * args.num_epochs
    if run.active:
        print(f"{len(train)} training pairs, {len(heldout)} held-out pairs, {total_steps} steps")
    ddp_model = run.wrap(model)  # DDP: averages the gradients in backward
    # NOTE: fused: one kernel for all the parameters, not a loop over them (TRL's default adamw_torch_fused)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.0, fused=True)

    def run_eval() -> tuple[dict, list[dict]]:  # eval/kl: the drift from start_model, the starting policy
        T = args.temperature
        metrics, samples = evaluate(
            model, tokenizer, judge, eval_rows, T, args.max_new_tokens, run.dtype, start_model
        )  # fmt: skip
        with run.autocast():
            logps = all_logprobs(model, heldout, pad_id, args.batch_size)  # (N_eval, 2)
        margins = (logps - heldout_ref) @ torch.tensor([1.0, -1.0])
        # held-out pairs the implicit reward gets right; NOTE: a margin under 1e-4 nats is a tie (wrong):
        # two forwards of the same weights can differ by float rounding (~4e-6), deciding ties at random
        metrics["eval/accuracy"] = float((margins > 1e-4).float().mean())
        return metrics, samples

    # --resume: the last checkpoint's weights, optimizer, random states and step; else the eval of step 0
    start, state = run.begin({"model": model}, optimizer, tokenizer, run_eval)
    order = state.get("order")  # this epoch's order of the pairs
    model.train()
    for step in range(start, total_steps + 1):
        epoch, position = divmod(step - 1, steps_per_epoch)
        if position == 0:  # a new epoch, a new order
            order = run.rng.permutation(len(train))
        t0 = time.perf_counter()
        indices = order[position * args.batch_size : (position + 1) * args.batch_size]
        # DDP: this rank's share; equal shares, so the mean of the ranks' mean losses is the whole batch's
        share = args.batch_size // run.world
        indices = indices[run.rank * share : (run.rank + 1) * share]
        batch = [train[i] for i in indices]

        # 3. pi_ref's log-probs: looked up, or one no-grad forward (never recomputed within the step)
        if ref_logps is not None:
            ref_chosen_logps, ref_rejected_logps = ref_logps[indices].to(run.device).T
        else:
            with torch.no_grad(), run.autocast():
                ref_both, _ = batch_logprobs(ref_model, batch, pad_id)  # (B, 2)
            ref_chosen_logps, ref_rejected_logps = ref_both.T

        # 4. the policy's log-probs: one forward over chosen and rejected together
        with run.autocast():  # the forward in bf16 (or fp32); the loss below in fp32
            logps, lengths = batch_logprobs(ddp_model, batch, pad_id)  # (B, 2), (B, 2)

        # 5. the preference loss (+ RPO's NLL on the chosen completion, per token)
        loss, chosen_rewards, rejected_rewards = dpo_loss(
            chosen_logps=logps[:, 0],
            rejected_logps=logps[:, 1],
            ref_chosen_logps=ref_chosen_logps,
            ref_rejected_logps=ref_rejected_logps,
            beta=args.beta,
            loss_type=args.loss_type,
            label_smoothing=args.label_smoothing,
            chosen_lengths=lengths[:, 0],
            rejected_lengths=lengths[:, 1],
        )
        if args.rpo_alpha:
            # ALGO: RPO: the NLL of the chosen completion per token, which keeps log pi(y_c) from falling
            loss = loss + args.rpo_alpha * (-logps[:, 0] / lengths[:, 0]).mean()
        run.check_finite(loss, step, "loss", "lower --learning-rate or check the data")

        # 6. clip, schedule (warm-up, then linear decay to 0), step
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        lr = args.learning_rate * min(step / max(1, args.warmup_steps), 1 - (step - 1) / total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_s = time.perf_counter() - t0

        # 7. log (averaged over the ranks), evaluate and save on schedule
        metrics = {
            "epoch": epoch,
            "train/loss": loss.detach(),
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/margins": chosen_rewards.mean() - rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "logps/chosen": logps[:, 0].detach().mean(),
            "logps/rejected": logps[:, 1].detach().mean(),
            "train/grad_norm": grad_norm,
            "train/lr": lr,
            "perf/step_s": step_s,
            "perf/tokens_per_s": sum(len(p) + len(c) + len(r) for p, c, r in batch) / step_s,
        }
        run.end_step(step, total_steps, metrics if step % args.log_every == 0 else None, order=order)
    return {"train/loss": float(loss.detach()), **run.close()}


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
