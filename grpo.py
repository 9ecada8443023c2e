"""GRPO — Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300, §4.1).

For each prompt q, sample a group of G completions o_1..o_G from the current policy (= pi_old) and score
them with the judge: r_1..r_G. Every token of o_i gets the group-relative advantage (Eq. 3 of the paper)
    A_i = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + eps)
and we maximise the clipped surrogate with a KL penalty towards a frozen reference policy (Eq. 3):
    J = E[ agg_{i,t} ( min(rho_it A_i, clip(rho_it, 1 - eps_low, 1 + eps_high) A_i) - beta KL_it ) ]
    rho_it = pi(o_it | q, o_i<t) / pi_old(o_it | q, o_i<t)
    KL_it  = k3 = pi_ref/pi - log(pi_ref/pi) - 1   (Schulman's unbiased, positive estimator; Eq. 4)
Each choice on which later work departs from the paper is a flag, so these are settings of one loop:
    paper GRPO  --scale-rewards group --loss-agg seq-mean   --beta 0.04 (--learning-rate 2e-4 on the painter)
    Dr. GRPO    --scale-rewards none  --loss-agg constant   --beta 0     (Liu et al. 2025, arXiv:2503.20783)
    DAPO        --scale-rewards group --loss-agg token-mean --clip-eps-high 0.28 --beta 0 --mask-truncated
                --dynamic-sampling --judge JUDGE+overlong:20480:4096 (Yu et al. 2025, arXiv:2503.14476)
    GSPO        --scale-rewards group --loss-agg seq-mean --importance-sampling-level sequence --beta 0
                --clip-eps-low 3e-4 --clip-eps-high 4e-4 --num-iterations 2 (Zheng et al. 2025, 2507.18071)
    CISPO       --scale-rewards group --loss-agg token-mean --policy-loss cispo --clip-eps-high 4 --beta 0
                (MiniMax-M1, arXiv:2506.13585; the weight capped at 1 + 4 = 5, ScaleRL's eps_max)
    RLOO, REINFORCE: see reinforce.py (same loop, no ratio, a leave-one-out baseline, KL in the reward)
GSPO's per-sequence ratio, like all, is 1 while mu = 1 (GSPO's gradient is then GRPO's): it acts off-policy
(--num-iterations > 1). Its loss is one number per sequence, averaged by seq-mean as in the paper; token-mean
and constant weigh it by length (TRL warns). CISPO is here, not in reinforce.py: its weight needs pi_old.
Differences from the paper: (1) defaults of no std, beta 0.1 (with the group's std any reward gap is +-1, the
KL never binds and the names collapse: README); (2) one update per batch (mu = 1, as DeepSeekMath's runs, TRL,
verl), so rho = 1; --num-iterations > 1 reuses each batch; (3) a judge; (4) constant lr, no warm-up.
Shapes: B prompts per step, G completions per prompt, N = B*G sequences, P prompt tokens (left padded),
T completion tokens, V vocab.
Run: python grpo.py --group-size 8     (several processes: torchrun --nproc_per_node 2 grpo.py)
"""

import time
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import tyro
from torch.nn.functional import pad
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
    scale_rewards: Literal["group", "batch", "none"] = "none"
    """divide advantages by the group's std (GRPO), the batch's std (TRL "batch"), or not (Dr. GRPO)"""
    loss_agg: Literal["seq-mean", "token-mean", "constant"] = "seq-mean"
    """mean over each sequence's tokens then over sequences (GRPO); over all tokens of the batch (DAPO);
    sum divided by N * max_new_tokens (Dr. GRPO)"""
    clip_eps_low: float = 0.2
    """epsilon: the ratio is clipped below at 1 - clip_eps_low"""
    clip_eps_high: float = 0.2
    """the ratio is clipped above at 1 + clip_eps_high (DAPO's clip-higher: 0.28)"""
    importance_sampling_level: Literal["token", "sequence"] = "token"
    """one ratio per token (GRPO), or one per sequence, the geometric mean of its tokens' ratios (GSPO)"""
    policy_loss: Literal["clip", "cispo"] = "clip"
    """clip: PPO's clipped surrogate; cispo: -sg(min(rho, 1 + clip_eps_high)) A log pi (MiniMax-M1)"""
    num_iterations: int = 1
    """mu: policy updates per generated batch (old log-probs kept from before the first)"""
    beta: float = 0.1
    """beta: weight of the KL penalty towards the frozen reference (0 = no reference loaded; TRL's default)"""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """per-token KL estimator in the loss: k1 = log(pi/pi_ref), k2 = (log ratio)^2 / 2, k3 (the paper's);
    k1's expected gradient in the loss is zero (it belongs in the reward, as reinforce.py puts it)"""
    mask_truncated: bool = False
    """drop completions that never stop from the loss (DAPO; TRL mask_truncated_completions)"""
    dynamic_sampling: bool = False
    """train only on groups whose rewards are not all equal, sampling more prompts to fill the batch (DAPO)"""
    max_sampling_rounds: int = 4
    """--dynamic-sampling: at most this many batches sampled per step; then the groups kept so far"""
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
    """Adam learning rate (constant); None = 1e-3 for the painter, 1e-6 for a --model (TRL's GRPO default)"""
    max_grad_norm: float = 1.0
    """clip the global gradient norm to this"""
    # eval and logging
    eval_every: int = 100
    """evaluate (and save) every this many steps, and at the start and end"""
    eval_size: int = 64
    """held-out prompts per eval"""
    log_every: int = 10
    """print and log train metrics every this many steps"""


# ALGO: group-relative advantages (Eq. 3 of DeepSeekMath; Dr. GRPO drops the std)
def group_advantages(rewards: torch.Tensor, scale: str, eps: float = 1e-4) -> torch.Tensor:
    """rewards (B, G) -> advantages (B, G): reward minus its group's mean, optionally scaled by a std.
    NOTE: groups are rows, i.e. formed by prompt index: two equal prompts in a batch stay two groups."""
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    if scale == "group":
        return centered / (rewards.std(dim=1, keepdim=True) + eps)  # Bessel-corrected std, eps 1e-4 as TRL
    if scale == "batch":
        return centered / (rewards.std() + eps)
    return centered


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


# ALGO: KL estimators (Schulman 2020, "Approximating KL divergence"), each a function of log pi - log pi_ref
def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi. k1 and k3 are unbiased; k2 is
    biased (its mean is E[(log ratio)^2] / 2) but has the lowest variance; k3 is always >= 0."""
    log_ratio = logprobs - ref_logprobs
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    # NOTE: unclamped: exp(-log_ratio) overflows only past ~88 nats, far beyond where beta lets a run go;
    # verl and OpenRLHF clamp the estimate to +-10 or +-20 for long completions
    return torch.exp(-log_ratio) + log_ratio - 1  # pi_ref/pi - log(pi_ref/pi) - 1


def aggregate(per_token, mask, mode: str, n_sequences: int, n_tokens: float, max_new_tokens: int):
    """Reduce a (n, T) per-token loss to a scalar, with normalisers counted over the WHOLE batch so that
    micro-batches of it add up to exactly the full-batch loss.
    seq-mean   1/N sum_i 1/|o_i| sum_t l_it   (GRPO: a long completion's tokens weigh less each)
    token-mean 1/sum_i|o_i| sum_i sum_t l_it  (DAPO: every token weighs the same)
    constant   1/(N T_max) sum_i sum_t l_it   (Dr. GRPO: no length bias, no batch dependence)"""
    if mode == "seq-mean":
        return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / n_sequences
    if mode == "token-mean":
        return (per_token * mask).sum() / max(n_tokens, 1)
    return (per_token * mask).sum() / (n_sequences * max_new_tokens)


# ALGO: the clipped surrogate with the KL penalty in the loss (Eq. 3 of DeepSeekMath; PPO's Eq. 7)
def grpo_loss(logprobs, old_logprobs, advantages, mask, eps_low, eps_high, beta, kl, level="token",
              policy_loss="clip", **agg):  # fmt: skip
    """-(surrogate - beta KL), aggregated; also the number of tokens where the clip is active. level
    "sequence" (GSPO Eq. 7): each token of o_i gets s_i = exp(1/|o_i| sum_t log rho_it). policy_loss "cispo"
    (MiniMax-M1 Eq. 4; no lower bound, as TRL): -sg(min(rho, 1 + eps_high)) A log pi, sg: stop-gradient."""
    log_ratio = logprobs - old_logprobs  # (n, T)
    if level == "sequence":  # NOTE: the mean over the sequence's real tokens, then one ratio for all of them
        log_ratio = ((log_ratio * mask).sum(1) / mask.sum(1).clamp(min=1))[:, None].expand_as(logprobs)
    ratio, A = torch.exp(log_ratio), advantages[:, None]
    if policy_loss == "cispo":  # every token keeps a gradient, where clip drops those past 1 + eps
        weight = torch.clamp(ratio, max=1 + eps_high).detach()
        per_token, clip_active = -weight * A * logprobs, ratio > 1 + eps_high
    else:
        per_token = -torch.min(ratio * A, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * A)
        clip_active = ((ratio < 1 - eps_low) & (A < 0)) | ((ratio > 1 + eps_high) & (A > 0))
    return aggregate(per_token + beta * kl, mask, **agg), (clip_active.float() * mask).sum()


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


# ALGO: DAPO's dynamic sampling (§3.2 of arXiv:2503.14476): train only on groups whose rewards differ
def dynamic_sampling(rollout, sampled: tuple, B: int, G: int, max_rounds: int, run):
    """Batches (prompt_ids, prompt_mask, completion_ids, completion_mask, truncated, rewards) from rollout()
    until every rank holds B groups whose rewards differ (all equal: each A_i = 0, only weight in normalisers)
    or max_rounds are sampled; DDP: the same number of whole groups on each rank. -> them, rounds, dropped"""
    kept = []
    for rounds in range(1, max_rounds + 1):
        sampled = sampled if rounds == 1 else rollout()
        groups = sampled[-1].view(-1, G)
        keep = groups.max(1).values > groups.min(1).values  # (b,) NOTE: not std > 0: float noise passes that
        kept.append([t[keep.repeat_interleave(len(t) // len(keep)).to(t.device)] for t in sampled])  # b, b*G
        counts = run.all_gather(torch.tensor([sum(len(k[0]) for k in kept)]))  # DDP: every rank's kept groups
        if counts.min() >= B:
            break
    n, P, T = min(B, int(counts.min())), *(max(k[i].shape[1] for k in kept) for i in (0, 2))
    # the first n groups, prompts left padded to the rounds' longest P, completions right to T (id 0: masked)
    sampled = [torch.cat([pad(k[i], (P - k[i].shape[1], 0)) for k in kept])[:n] for i in (0, 1)]
    sampled += [torch.cat([pad(k[i], (0, T - k[i].shape[1])) for k in kept])[: n * G] for i in (2, 3)]
    sampled += [torch.cat([k[i] for k in kept])[: n * G] for i in (4, 5)]  # truncated, rewards
    return sampled, rounds, rounds * B * run.world - int(counts.sum())


def main(args: Args) -> dict:
    # DDP: each rank samples its own completions; --learning-rate: the painter's, or TRL's for a --model
    run = Run("grpo", args, seed_per_rank=True, learning_rate=(1e-3, 1e-6))
    args = run.args  # --resume: the run's own settings
    B, G = args.batch_size // run.world, args.group_size  # DDP: B: this rank's prompts, each with its group
    N = B * G  # this rank's completions
    if args.batch_size % run.world:
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by the {run.world} processes")
    if G < 2:
        raise ValueError(f"--group-size {G}: a group baseline needs at least 2 completions per prompt")
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

    def rollout() -> tuple:  # 1.-3. of a step (below): B prompts, G completions of each, scored
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
        return prompt_ids, prompt_mask, completion_ids, completion_mask, truncated, rewards

    # --resume: the last checkpoint's weights, optimizer, random states and step; else the eval of step 0
    start, state = run.begin({"model": model}, optimizer, tokenizer, run_eval)
    for step in range(start, args.total_steps + 1):
        t0 = time.perf_counter()
        sampled, counts = rollout(), {}  # 1.-3. (above)
        if args.dynamic_sampling:  # DAPO: more prompts until this rank holds B groups whose rewards differ
            sampled, rounds, dropped = dynamic_sampling(rollout, sampled, B, G, args.max_sampling_rounds, run)
            counts = {"train/dropped_groups": dropped, "train/extra_rounds": rounds - 1}  # dropped: all ranks
        prompt_ids, prompt_mask, completion_ids, completion_mask, truncated, rewards = sampled
        N = len(completion_ids)  # this rank's completions: B * G, or fewer with --dynamic-sampling
        if N == 0:  # --dynamic-sampling kept no group: no update this step, only its counts logged
            run.end_step(step, args.total_steps, counts)
            continue
        completion_len = completion_mask.sum(1).mean()
        if args.mask_truncated:  # NOTE: after the judge, which may count the tokens of every completion
            completion_mask = completion_mask * (~truncated)[:, None]

        # 4. advantages per group, from the whole batch's rewards, then this rank's rows
        all_rewards = run.all_gather(rewards)  # DDP: (world * N,), in rank order
        all_advantages = group_advantages(all_rewards.view(-1, G), args.scale_rewards).view(-1)
        advantages = all_advantages[run.rank * N : (run.rank + 1) * N].to(run.device)  # (N,)

        # 5. old and reference log-probs, without gradient
        parts = micro_batches(N, G, args.micro_batch_size)  # (completions, their prompts) of each micro-batch
        batch = (prompt_ids, prompt_mask, completion_ids, completion_mask, args.temperature, parts)
        with torch.no_grad(), run.autocast():
            old_logprobs = None  # with mu = 1 the policy has not moved yet: old = current, detached
            if args.num_iterations > 1:
                old_logprobs = batched_logprobs(model, *batch)
            ref_logprobs = batched_logprobs(ref_model, *batch) if ref_model is not None else None

        # 6. mu passes over this batch, each accumulated over micro-batches and ended by one optimiser step
        # DDP: the gradients are AVERAGED over ranks, so each rank divides by its share of the whole batch's
        # count (of completions or tokens): k processes with B/k prompts give the gradient of one with B
        n_tokens = float(run.all_sum(completion_mask.sum())) / run.world
        agg = dict(mode=args.loss_agg, n_sequences=N, n_tokens=n_tokens, max_new_tokens=args.max_new_tokens)
        logging = step % args.log_every == 0
        for i, (s, p) in enumerate(parts * args.num_iterations):  # s: the completions, p: their prompts
            if i % len(parts) == 0:  # a pass begins: its sums over the micro-batches, for the log
                loss_sum, clipped_sum, kl_sum, entropy_sum = (torch.zeros(()) for _ in range(4))
            last = (i + 1) % len(parts) == 0  # the pass's last micro-batch: DDP all-reduces, then a step
            mask = completion_mask[s]
            with run.sync_gradients(ddp_model, sync=last):
                with run.autocast():  # the forward in bf16 (or fp32); the loss below in fp32
                    logprobs, logits = forward_logprobs(
                        ddp_model, prompt_ids[p], prompt_mask[p], completion_ids[s], mask, args.temperature
                    )
                old = logprobs.detach() if old_logprobs is None else old_logprobs[s]
                kl = torch.zeros_like(logprobs)
                if ref_model is not None:
                    kl = kl_estimate(logprobs, ref_logprobs[s], args.kl_estimator)
                loss, clipped = grpo_loss(
                    logprobs=logprobs, old_logprobs=old, advantages=advantages[s], mask=mask, kl=kl,
                    beta=args.beta, eps_low=args.clip_eps_low, eps_high=args.clip_eps_high,
                    level=args.importance_sampling_level, policy_loss=args.policy_loss, **agg,
                )  # fmt: skip
                loss.backward()
            loss_sum += loss.detach().cpu()
            clipped_sum += clipped.detach().cpu()
            kl_sum += (kl * mask).sum().detach().cpu()
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
            group_std = all_rewards.view(-1, G).std(1)
            tokens = max(n_tokens, 1)  # DDP: this rank's share of the batch's completion tokens
            metrics = {
                "train/loss": loss_sum,
                "train/reward": float(all_rewards.mean()),
                "train/reward_std": float(group_std.mean()),
                "train/frac_zero_std": float((group_std < 1e-6).float().mean()),
                "train/clipfrac": clipped_sum.double() / tokens,
                "train/entropy": entropy_sum.double() / tokens,
                "train/grad_norm": float(grad_norm),
                "train/completion_len": completion_len,
                "train/truncated": truncated.float().mean(),
                "perf/step_s": step_s,
                "perf/tokens_per_s": (G * prompt_mask.sum() + completion_mask.sum()) / step_s,
            }
            if ref_model is not None:
                metrics["train/kl"] = kl_sum.double() / tokens
            metrics.update(counts)  # --dynamic-sampling: groups dropped, batches sampled after the first
        run.end_step(step, args.total_steps, metrics)
    return run.close()


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
