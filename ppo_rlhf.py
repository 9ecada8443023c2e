"""PPO-RLHF — PPO with a value model, a reward model (or judge) and a KL penalty to a frozen reference
(Ouyang et al. 2022, InstructGPT, §3.5 Eq. 2; Stiennon et al. 2020, §3.4; Ziegler et al. 2019, §2.2;
PPO: Schulman et al. 2017, Eq. 7 and 9; GAE: Schulman et al. 2016, Eq. 16). Implementation details follow
"The N Implementation Details of RLHF with PPO" (Huang et al. 2024, arXiv:2403.17031; "N-blog" below) and
its code, summarize_from_feedback_details (SFD) @ ee77a9a, and TRL's PPOTrainer @ f2cd577
(trl/experimental/ppo).

Four roles: the policy pi (trained), the reference pi_ref (a frozen copy of the starting policy), the score
r(x, y) (a reward model from reward_model.py, or a judge) and the value model V (trained; initialised from the
reward model when there is one, else from the policy's backbone with a zero scalar head). Each completion y of
prompt x is an episode whose actions are its tokens y_t. Each token has a reward (InstructGPT Eq. 2):
    r_t = -beta * k1_t  +  [t = last real token] * r(x, y),   k1_t = log pi(y_t | s_t) - log pi_ref(y_t | s_t)
GAE (gamma, lambda) turns rewards and values into advantages; returns are advantages + values:
    delta_t = r_t + gamma V(s_t+1) - V(s_t),    A_t = delta_t + gamma lambda A_t+1,    R_t = A_t + V(s_t)
and epochs x shuffled minibatches minimise the clipped surrogate plus the clipped value loss:
    L = mean_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps))
        + vf_coef * 1/2 mean_t max((V_t - R_t)^2, (clip(V_t, V_old_t - eps_v, V_old_t + eps_v) - R_t)^2)
    rho_t = pi(y_t | s_t) / pi_old(y_t | s_t),  means over the real completion tokens of the minibatch
Differences from InstructGPT: (1) no pretraining-mix term (PPO-ptx, gamma_ptx = 0); (2) a judge or a tiny
reward model, not a 6B RM; (3) the score sits on the last real token, not one position later (see ALGO below;
TRL #1893); (4) one optimiser for policy and value (as TRL), Adam eps 1e-5 (SFD), LR annealed linearly to 0.
With --reward-model, --judge is not trained on: it is the "gold" reward of the eval, so eval/reward against
train/score shows over-optimisation of the proxy (Gao et al. 2022).
Shapes: N sequences (prompts) per rollout, M per minibatch, P prompt, T completion tokens, V vocab, D hidden
Run: python ppo_rlhf.py        # judge poet+correct, ~3 min on 2 CPU cores (torchrun: several processes)
     python ppo_rlhf.py --reward-model runs/reward_model__.../model --judge poet
"""

import copy
import time
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
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
    """seed for python, numpy and torch (prompt order, sampling, minibatch order)"""
    # model, reward and task
    model: Optional[str] = None
    """HF causal LM to train (folder or hub id); None = the shipped painter"""
    reward_model: Optional[str] = None
    """a reward model saved by reward_model.py: the score r(x, y), and the value model's starting point;
    it must share the policy's tokenizer (it reads the policy's token ids)"""
    judge: str = "poet+correct"
    """the score without --reward-model (a judge or weighted sum); with one, the eval's gold reward"""
    prompts: Optional[str] = None
    """JSONL of {"prompt", ...} rows (other columns go to the judge); None = the training-split hexes"""
    eval_prompts: Optional[str] = None
    """JSONL of held-out rows for the eval; None = the rows of a tenth of --prompts' prompts, held out"""
    # algorithm
    kl_coef: float = 0.05
    """beta: weight of the per-token k1 penalty in the reward (TRL, SFD: 0.05); the start if adaptive"""
    target_kl: Optional[float] = None
    """KL_target (nats per completion) of the adaptive controller (Ziegler et al. 2019 §2.2); None: fixed"""
    kl_horizon: float = 10000
    """horizon of the adaptive controller: beta *= 1 + clip(KL/KL_target - 1, -0.2, 0.2) * N / horizon"""
    truncated: Literal["penalty", "mask", "none"] = "penalty"
    """no EOS: score := --truncated-score (EOS trick, SFD), drop from the loss (DAPO), or score as is"""
    truncated_score: float = -1.0
    """the fixed score of a completion that never reached EOS (SFD penalty_reward_value = -1)"""
    gamma: float = 1.0
    """gamma: discount (1 as TRL and SFD: the score is the only reward that matters, at the end)"""
    lam: float = 0.95
    """lambda: GAE bias/variance trade-off (TRL and SFD: 0.95; OpenRLHF and verl: 1.0)"""
    clip_eps: float = 0.2
    """epsilon: the ratio is clipped to [1 - eps, 1 + eps]"""
    value_clip: float = 0.2
    """eps_v: how far the new value may move from the rollout's before the loss stops pulling"""
    vf_coef: float = 0.1
    """weight of the value loss (TRL and SFD: 0.1)"""
    whiten_rewards: bool = False
    """scale the per-token rewards to unit variance before GAE (mean kept; TRL whiten_rewards)"""
    temperature: float = 1.0
    """sampling temperature; log-probs are computed from logits / temperature to match the sampler"""
    max_new_tokens: int = 8
    """T: longest completion (painter names take 2-4 tokens plus EOS)"""
    # optimisation
    total_steps: int = 300
    """rollout-update steps"""
    batch_size: int = 32
    """N: prompts per rollout, one completion each"""
    num_minibatches: int = 2
    """minibatches per epoch (M = N / num_minibatches); one optimiser step each"""
    num_ppo_epochs: int = 4
    """passes over each rollout (TRL and SFD: 4)"""
    learning_rate: Optional[float] = None
    """Adam learning rate of policy and value, annealed linearly to 0 (SFD, N-blog detail 5); None = 2e-4 for
    the painter, 3e-6 for a --model (TRL's PPO default)"""
    max_grad_norm: float = 1.0
    """clip the global gradient norm (policy and value together) to this"""
    # eval and logging
    eval_every: int = 50
    """evaluate (and save) every this many steps, and at the start and end"""
    eval_size: int = 64
    """held-out prompts per eval"""
    log_every: int = 10
    """print and log train metrics every this many steps"""


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


def forward_values(value_model, input_ids, attention_mask, n_prompt: int) -> torch.Tensor:
    """V(s_t) (N, T): the scalar head on every hidden state, read where the policy's logits for y_t are."""
    positions = (attention_mask.cumsum(1) - 1).clamp(min=0)
    # NOTE: the model's own forward (so that DDP syncs the gradients); its last hidden state feeds the head
    out = value_model(input_ids, attention_mask=attention_mask, position_ids=positions,
                      output_hidden_states=True, use_cache=False)  # fmt: skip
    head = getattr(value_model, "module", value_model).score  # DDP: the wrapped model's head
    # NOTE: the state s_t before token y_t is the prefix ending at P-1+t, the same shift as the logits
    return head(out.hidden_states[-1][:, n_prompt - 1 : -1]).squeeze(-1).float()


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


# ALGO: masked whitening (TRL core masked_whiten: unbiased variance; SFD, N-blog detail 12)
def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the real tokens only; padding is ignored and comes back as 0.
    shift_mean=False keeps the mean (used for rewards, so a positive score stays positive)."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_mean((x - mean) ** 2, mask) * n / (n - 1).clamp(min=1)  # NOTE: Bessel's correction, as TRL
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    return (whitened if shift_mean else whitened + mean) * mask


# ALGO: the EOS trick (N-blog detail 4; SFD ppo.py:663-667; TRL missing_eos_penalty)
def sequence_scores(scores: torch.Tensor, truncated: torch.Tensor, mode: str, penalty: float) -> torch.Tensor:
    """(N,) scores -> the score each episode ends with: a completion that never said EOS gets the fixed
    penalty, so the policy learns to finish instead of being paid for a half name (mode "penalty")."""
    return torch.where(truncated, torch.full_like(scores, penalty), scores) if mode == "penalty" else scores


# ALGO: per-token rewards, InstructGPT Eq. 2 spread over tokens (N-blog detail 11)
def per_token_rewards(
    scores, logprobs, ref_logprobs, completion_mask, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,), (N, T) x 3 -> rewards (N, T) and their KL part, non_score_rewards (N, T).
    -beta * k1 on every real completion token (k1 is a number here, no gradient: the KL enters as reward),
    and the score on the LAST REAL token: EOS, or token T-1 for a completion cut at max_new_tokens.
    NOTE: TRL and SFD add the score at index sequence_length + 1, the first pad AFTER the EOS
    (`padding_mask_p1`, TRL ppo_trainer.py:762-779, SFD ppo.py); it still trains because their value mask
    keeps that extra slot, so the score reaches EOS only through V and gamma*lambda*A of a padding position
    (TRL #1893, #3750, PR #5338). The episode ends with the EOS action, so its reward belongs to it: we put it
    there, as OpenRLHF and verl do, and no padding position ever gets a reward or a value."""
    non_score_rewards = -kl_coef * (logprobs - ref_logprobs) * completion_mask
    lengths = completion_mask.sum(1)  # (N,), 0 for masked rows
    last = (lengths - 1).clamp(min=0).long()
    rewards = non_score_rewards.clone()
    rewards[torch.arange(len(last), device=last.device), last] += scores * (lengths > 0)
    return rewards, non_score_rewards


# ALGO: generalised advantage estimation (Schulman et al. 2016, Eq. 16), backwards over the tokens
def gae(rewards, values, mask, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, T) x 3 -> advantages and returns (N, T). The state after the last real token is terminal: its value
    is 0 (we zero values on padding, which also zeroes delta and A there)."""
    values, rewards = values * mask, rewards * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    return advantages * mask, (advantages + values) * mask  # returns R_t = A_t + V(s_t) (TRL, SFD)


# ALGO: the clipped surrogate (PPO Eq. 7), per token, written as a loss to minimise
def policy_loss(
    logprobs, old_logprobs, advantages, mask, clip_eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over real tokens of max(-A rho, -A clip(rho)), and the share of tokens where the clip is
    active."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    return masked_mean(torch.max(unclipped, clipped), mask), masked_mean((clipped > unclipped).float(), mask)


# ALGO: the clipped value loss (PPO2 / OpenAI baselines; TRL and SFD, N-blog detail 13)
def value_loss(values, old_values, returns, mask, value_clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """1/2 mean over real tokens of max((V - R)^2, (V_clipped - R)^2) and the share where the clip binds."""
    clipped_values = old_values + torch.clamp(values - old_values, -value_clip, value_clip)
    unclipped_loss, clipped_loss = (values - returns) ** 2, (clipped_values - returns) ** 2
    return 0.5 * masked_mean(torch.max(unclipped_loss, clipped_loss), mask), masked_mean(
        (clipped_loss > unclipped_loss).float(), mask
    )


def trained_rows_kl(logprobs, ref_logprobs, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the per-completion KL, sum_t log pi - log pi_ref, over the rows that train; their number).
    NOTE: a row that --truncated mask leaves out has no tokens: counted, it would pull the mean toward 0"""
    trains = mask.sum(1) > 0
    return ((logprobs - ref_logprobs) * mask).sum(1)[trains].sum(), trains.sum()


# ALGO: the adaptive KL controller (Ziegler et al. 2019 §2.2; lm-human-preferences AdaptiveKLController)
def adaptive_kl_coef(kl_coef: float, kl: float, target: float, n_episodes: int, horizon: float) -> float:
    """beta_next = beta * (1 + K * e), e = clip(KL / KL_target - 1, -0.2, 0.2), K = n_episodes / horizon."""
    return kl_coef * (1 + float(np.clip(kl / target - 1, -0.2, 0.2)) * n_episodes / horizon)


def main(args: Args) -> dict:
    # DDP: each rank samples its own completions; --learning-rate: the painter's, or TRL's for a --model
    run = Run("ppo_rlhf", args, seed_per_rank=True, learning_rate=(2e-4, 3e-6))
    args = run.args  # --resume: the run's own settings
    N = args.batch_size // run.world  # DDP: this rank's share of the prompts
    if args.batch_size % run.world or N % args.num_minibatches or N // args.num_minibatches < 2:
        per = f" / {run.world} processes" if run.world > 1 else ""
        raise ValueError(
            f"--num-minibatches {args.num_minibatches} must divide --batch-size {args.batch_size}"
            f"{per} into minibatches of 2 or more"
        )
    M = N // args.num_minibatches
    rows, eval_rows = load_prompts(args.prompts, args.eval_prompts, args.batch_size, args.eval_size)

    # the four roles, dropout off in all (N-blog detail 9); the trained ones and the reference in fp32, the
    # frozen reward model may be bf16
    judge = get_judge(args.judge, args.device, [r["prompt"] for r in rows + eval_rows])
    model, tokenizer = load_model_and_tokenizer(args.model, run.load_device)  # policy; FSDP: on the host
    model = run.lora(model)  # LoRA: rank-R adapters, the base frozen (common/lora.py); else the model itself
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    # NOTE: train mode, or transformers never recomputes a checkpointed layer (dropout is off all the same)
    model.train()
    # NOTE: the reference is an fp32 copy run under the same autocast: it computes exactly what the policy
    # computed at step 0 (a bf16 copy keeps norms and residuals in bf16: a KL to rounding noise)
    # and, copied after the checkpointing flag, takes the policy's forward path (plain, not prompt-shared)
    ref_model = run.reference(model)  # reference; LoRA: the policy with its adapters off; FSDP: sharded
    reward_model = None
    if args.reward_model is not None:  # reward; the value model starts from it (SFD ppo.py:482, TRL)
        policy_tokenizer = dict(reward_model_for=tokenizer)  # checked: a reward model, the same tokenizer
        reward_model = load_model_and_tokenizer(args.reward_model, run.load_device, **policy_tokenizer)[0]
        value_model = copy.deepcopy(reward_model)
        reward_model = reward_model.to(run.device, run.dtype).eval().requires_grad_(False)  # not sharded
    else:  # the backbone with a scalar head; NOTE: V = 0 at first (OAI's N(0, 0), N-blog detail 8)
        value_model = load_model_and_tokenizer(args.model, run.load_device, scalar_head=True)[0]
        torch.nn.init.zeros_(value_model.score.weight)
    value_model = run.lora(value_model)  # LoRA: its own adapters and the scalar head train
    if args.gradient_checkpointing:
        value_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    value_model.train()
    # the sampler: softmax(logits / temperature) from our flags only; its stop ids also end the masks
    sampling = sampling_config(tokenizer, model, args.temperature, args.max_new_tokens)
    stop_ids = torch.tensor(sampling.eos_token_id, device=run.device)
    ddp_model, ddp_value_model = run.wrap(model), run.wrap(value_model)  # DDP: each averages its gradients
    # NOTE: Adam eps 1e-5 as SFD (ppo.py); PyTorch's 1e-8 makes larger early updates (N-blog detail 14)
    trained = list(model.parameters()) + list(value_model.parameters())
    # NOTE: fused: one kernel for all the parameters, not a loop over them (TRL's default adamw_torch_fused)
    optimizer = torch.optim.Adam(trained, lr=args.learning_rate, eps=1e-5, fused=True)

    def run_eval() -> tuple[dict, list[dict]]:  # eval/kl: the drift from ref_model, the starting policy
        T = args.temperature
        return evaluate(model, tokenizer, judge, eval_rows, T, args.max_new_tokens, run.dtype, ref_model)

    # --resume: the last checkpoint's weights, optimizer, random states and step; else the eval of step 0
    start, state = run.begin({"model": model, "value_model": value_model}, optimizer, tokenizer, run_eval)
    kl_coef = state.get("kl_coef", args.kl_coef)  # beta, adaptive with --target-kl
    for step in range(start, args.total_steps + 1):
        t0 = time.perf_counter()
        # 1. sample the batch's prompts, one completion each
        batch_rows = [rows[i] for i in run.rng.choice(len(rows), size=args.batch_size, replace=False)]
        batch_rows = batch_rows[run.rank * N : (run.rank + 1) * N]  # DDP: this rank's N prompts
        prompts = [r["prompt"] for r in batch_rows]

        # 2. generate from softmax(logits / temperature), nothing else (no top-k, top-p or penalty), with a KV
        # cache and dropout off; the prompts left padded (N, P); the mask ends after the first stop token
        with run.autocast():
            prompt_ids, prompt_mask, completion_ids = sample(model, tokenizer, prompts, sampling)
        P, sequences = prompt_ids.shape[1], torch.cat([prompt_ids, completion_ids], dim=1)  # (N, P+T)
        completion_mask, truncated = completion_mask_from(completion_ids, stop_ids)
        attention_mask = torch.cat([prompt_mask, completion_mask.long()], dim=1)  # (N, P+T), none after EOS
        completion_len = completion_mask.sum(1).mean()

        # 3. score: the reward model on the policy's own token ids (last real token), or the judge on the text
        if reward_model is not None:
            with torch.no_grad(), run.autocast():
                rollout = (prompt_ids, prompt_mask, completion_ids, completion_mask)
                raw_scores = score_last_token(reward_model, *rollout)
        else:  # TRL's reward signature: the rows' other columns ("answer"), truncated, completion_ids
            texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
            completions = [c.strip() for c in texts]
            columns = {key: [r[key] for r in batch_rows] for key in batch_rows[0] if key != "prompt"}
            ids = [row[m > 0].tolist() for row, m in zip(completion_ids.cpu(), completion_mask.cpu())]
            scores = judge(prompts, completions, completion_ids=ids, truncated=truncated.tolist(), **columns)
            raw_scores = torch.tensor(scores, dtype=torch.float32)
        scores = sequence_scores(raw_scores.to(run.device), truncated, args.truncated, args.truncated_score)
        if args.truncated == "mask":
            completion_mask = completion_mask * (~truncated)[:, None]

        # 4. the rollout's log-probs (policy = pi_old, reference) and values (N, T), once, without gradient
        with torch.no_grad(), run.autocast():
            rollout = (prompt_ids, prompt_mask, completion_ids, completion_mask, args.temperature)
            old_logprobs, _ = forward_logprobs(model, *rollout)
            ref_logprobs, _ = forward_logprobs(ref_model, *rollout)
            old_values = forward_values(value_model, sequences, attention_mask, P) * completion_mask

        # 5. per-token rewards, GAE, returns, whitened advantages (in fp32)
        with torch.no_grad():
            rewards, non_score_rewards = per_token_rewards(
                scores, old_logprobs, ref_logprobs, completion_mask, kl_coef
            )
            if args.whiten_rewards:
                rewards = masked_whiten(rewards, completion_mask, shift_mean=False)
            advantages, returns = gae(rewards, old_values, completion_mask, args.gamma, args.lam)
            # NOTE: whitened after the returns are taken
            advantages = masked_whiten(advantages, completion_mask)
            # DDP: the whitening (and the minibatch token means below) use this rank's tokens, as TRL's PPO
            # does; k processes then match one process with the whole batch in expectation, not bit for bit
        run.check_finite(torch.cat([old_values, advantages]), step, "values or advantages", "lower "
                         "--learning-rate or check the reward model")  # fmt: skip

        # 6. num_ppo_epochs passes, each over shuffled minibatches of M sequences, one optimiser step each
        logging = step % args.log_every == 0
        names = (
            "loss",
            "policy_loss",
            "value_loss",
            "clipfrac",
            "value_clipfrac",
            "approx_kl",
            "entropy",
            "grad_norm",
        )
        totals = {name: torch.zeros(()) for name in names}  # summed over the epochs' minibatches
        for _ in range(args.num_ppo_epochs):
            for s in torch.from_numpy(run.rng.permutation(N)).to(run.device).split(M):
                mask = completion_mask[s]
                with run.autocast():  # the forwards in bf16 (or fp32); the losses below in fp32
                    logprobs, logits = forward_logprobs(
                        ddp_model, prompt_ids[s], prompt_mask[s], completion_ids[s], mask, args.temperature
                    )
                    values = forward_values(ddp_value_model, sequences[s], attention_mask[s], P)
                pg_loss, clipfrac = policy_loss(logprobs, old_logprobs[s], advantages[s], mask, args.clip_eps)
                vf_loss, vf_clipfrac = value_loss(values, old_values[s], returns[s], mask, args.value_clip)
                loss = pg_loss + args.vf_coef * vf_loss
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(trained, args.max_grad_norm)
                run.check_finite(grad_norm, step, "gradient")
                optimizer.param_groups[0]["lr"] = args.learning_rate * (1 - (step - 1) / args.total_steps)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                with torch.no_grad():
                    approx_kl = masked_mean(0.5 * (logprobs - old_logprobs[s]) ** 2, mask)  # TRL approxkl
                    # the entropy is a pass over the whole vocabulary: only on logging steps
                    mean_entropy = (
                        masked_mean(entropy(logits, args.temperature), mask) if logging else torch.zeros(())
                    )
                values_ = (loss, pg_loss, vf_loss, clipfrac, vf_clipfrac, approx_kl, mean_entropy, grad_norm)
                for name, value in zip(names, values_):
                    totals[name] += float(value.detach())  # FSDP: grad_norm is a DTensor
        n_updates = args.num_ppo_epochs * args.num_minibatches
        means = {name: float(total / n_updates) for name, total in totals.items()}

        # 7. adapt beta (from the KL per completion, in nats, over the rows that train), log, eval, save
        kl_sum, n_rows = trained_rows_kl(old_logprobs, ref_logprobs, completion_mask)
        sequence_kl = float(run.all_sum(kl_sum) / run.all_sum(n_rows).clamp(min=1))
        logged_kl_coef = kl_coef
        if args.target_kl is not None:
            kl_coef = adaptive_kl_coef(kl_coef, sequence_kl, args.target_kl, args.batch_size, args.kl_horizon)
        step_s = time.perf_counter() - t0
        if logging:
            n_tokens = completion_mask.sum().clamp(min=1)
            residuals = returns - old_values
            residual_var = masked_mean(
                (residuals - masked_mean(residuals, completion_mask)) ** 2, completion_mask
            )
            returns_var = masked_mean((returns - masked_mean(returns, completion_mask)) ** 2, completion_mask)
            metrics = {
                "train/loss": means["loss"],
                "train/policy_loss": means["policy_loss"],
                "train/value_loss": means["value_loss"],
                "train/reward": float(raw_scores.mean()),
                "train/reward_std": float(raw_scores.std()),
                "train/score": float(scores.mean()),
                "train/non_score_reward": float(non_score_rewards.sum(1).mean()),
                "train/kl": float(((old_logprobs - ref_logprobs) * completion_mask).sum() / n_tokens),
                "train/kl_coef": logged_kl_coef,
                "train/approx_kl": means["approx_kl"],
                "train/clipfrac": means["clipfrac"],
                "train/value_clipfrac": means["value_clipfrac"],
                "train/explained_variance": float(1 - residual_var / returns_var.clamp(min=1e-8)),
                "train/entropy": means["entropy"],
                "train/grad_norm": means["grad_norm"],
                "train/completion_len": float(completion_len),
                "train/truncated": float(truncated.float().mean()),
                "perf/step_s": step_s,
                "perf/tokens_per_s": float(attention_mask.sum()) / step_s,
            }
        run.end_step(step, args.total_steps, metrics if logging else None, kl_coef=kl_coef)
    return run.close()


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
