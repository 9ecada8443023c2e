"""grpo.py: advantages, loss aggregation, clipping, KL estimators and log-probs by hand; smoke and CLI
runs."""

import json
import math
import os

import pytest
import torch

import grpo
from common.colours import eval_prompts
from common.models import encode_prompt
from conftest import ROOT, assert_run_console, assert_help_lists, assert_one_line_error, run_script
from conftest import saved_weights


def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0]])
    centered = torch.tensor([[-1.5, -0.5, 0.5, 1.5], [0.0, 0.0, 0.0, 0.0]])
    group_std = math.sqrt((2 * 1.5**2 + 2 * 0.5**2) / 3)  # Bessel-corrected, as torch.std
    expected_group = centered / torch.tensor([[group_std + 1e-4], [0.0 + 1e-4]])
    assert torch.allclose(grpo.group_advantages(rewards, "group"), expected_group)
    batch_std = rewards.flatten().std().item()  # values 1,2,3,4,5,5,5,5: mean 3.75
    assert batch_std == pytest.approx(math.sqrt(sum((x - 3.75) ** 2 for x in [1, 2, 3, 4, 5, 5, 5, 5]) / 7))
    assert torch.allclose(grpo.group_advantages(rewards, "batch"), centered / (batch_std + 1e-4))
    assert torch.equal(grpo.group_advantages(rewards, "none"), centered)
    for scale in ["group", "batch", "none"]:  # a group whose rewards are all equal carries no signal
        assert torch.equal(grpo.group_advantages(rewards, scale)[1], torch.zeros(4))


def test_groups_are_formed_by_prompt_index_not_text():
    rewards = torch.tensor([[0.0, 1.0], [2.0, 4.0]])  # two groups of the SAME prompt: still two groups
    assert torch.allclose(grpo.group_advantages(rewards, "none"), torch.tensor([[-0.5, 0.5], [-1.0, 1.0]]))


def test_loss_aggregation_modes_by_hand():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])  # lengths 3 and 1
    kw = dict(n_sequences=2, n_tokens=4, max_new_tokens=3)
    assert grpo.aggregate(per_token=per_token, mask=mask, mode="seq-mean", **kw).item() == pytest.approx(
        (2.0 + 4.0) / 2
    )
    assert grpo.aggregate(per_token=per_token, mask=mask, mode="token-mean", **kw).item() == pytest.approx(
        10.0 / 4
    )
    assert grpo.aggregate(per_token=per_token, mask=mask, mode="constant", **kw).item() == pytest.approx(
        10.0 / 6
    )


@pytest.mark.parametrize("mode", ["seq-mean", "token-mean", "constant"])
def test_micro_batches_give_the_full_batch_gradient(mode):
    torch.manual_seed(0)
    logits = torch.randn(6, 5, 11, requires_grad=True)
    tokens = torch.randint(0, 11, (6, 5))
    mask = torch.tensor(
        [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 0, 0, 0]]
    ).float()
    advantages = torch.randn(6)
    kw = dict(mode=mode, n_sequences=6, n_tokens=int(mask.sum()), max_new_tokens=5)

    def gradient(chunks):
        logits.grad = None
        for s in torch.arange(6).split(chunks):
            logprobs = grpo.token_logprobs(logits[s], tokens[s], 1.0)
            loss, _ = grpo.grpo_loss(
                logprobs=logprobs,
                old_logprobs=logprobs.detach(),
                advantages=advantages[s],
                mask=mask[s],
                eps_low=0.2,
                eps_high=0.2,
                beta=0.0,
                kl=torch.zeros_like(logprobs),
                **kw,
            )
            loss.backward()
        return logits.grad.clone()

    assert torch.allclose(gradient(6), gradient(2), atol=1e-7) and torch.allclose(
        gradient(6), gradient(1), atol=1e-7
    )


@pytest.mark.parametrize("level, policy_loss", [("token", "clip"), ("sequence", "clip"), ("token", "cispo")])
def test_clipped_surrogate_with_ratio_one_has_the_reinforce_gradient(level, policy_loss):
    """On-policy (mu = 1) GRPO, GSPO and CISPO all take the token-mean REINFORCE step: the variants differ off
    policy only."""
    torch.manual_seed(1)
    logits = torch.randn(4, 3, 7, requires_grad=True)
    tokens = torch.randint(0, 7, (4, 3))
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]]).float()
    advantages = torch.tensor([1.0, -2.0, 0.5, -0.1])
    logprobs = grpo.token_logprobs(logits, tokens, 1.0)
    loss, _ = grpo.grpo_loss(
        logprobs=logprobs,
        old_logprobs=logprobs.detach(),
        advantages=advantages,
        mask=mask,
        eps_low=0.2,
        eps_high=0.2,
        beta=0.0,
        kl=torch.zeros_like(logprobs),
        level=level,
        policy_loss=policy_loss,
        mode="token-mean",
        n_sequences=4,
        n_tokens=int(mask.sum()),
        max_new_tokens=3,
    )
    (surrogate_grad,) = torch.autograd.grad(loss, logits, retain_graph=True)
    reinforce = -(advantages[:, None] * logprobs * mask).sum() / mask.sum()  # -A grad log pi, same weights
    (reinforce_grad,) = torch.autograd.grad(reinforce, logits)
    assert torch.allclose(surrogate_grad, reinforce_grad, atol=1e-7)


def test_clip_binds_only_against_the_advantage():
    old = torch.zeros(1, 4)
    logprobs = torch.log(torch.tensor([[1.5, 0.5, 1.5, 0.5]]))  # ratios 1.5, 0.5, 1.5, 0.5
    mask = torch.ones(1, 4)
    kw = dict(mode="token-mean", n_sequences=1, n_tokens=4, max_new_tokens=4)
    zero = torch.zeros(1, 4)
    # A = +1: ratio 1.5 is clipped to 1.2, ratio 0.5 is not clipped (min picks the unclipped 0.5)
    loss, clipped = grpo.grpo_loss(
        logprobs=logprobs,
        old_logprobs=old,
        advantages=torch.tensor([1.0]),
        mask=mask,
        eps_low=0.2,
        eps_high=0.2,
        beta=0.0,
        kl=zero,
        **kw,
    )
    assert loss.item() == pytest.approx(-(1.2 + 0.5 + 1.2 + 0.5) / 4) and clipped.item() == 2
    # A = -1: ratio 0.5 is clipped to 0.8, ratio 1.5 is not; a higher eps_high changes nothing here
    loss, clipped = grpo.grpo_loss(
        logprobs=logprobs,
        old_logprobs=old,
        advantages=torch.tensor([-1.0]),
        mask=mask,
        eps_low=0.2,
        eps_high=0.28,
        beta=0.0,
        kl=zero,
        **kw,
    )
    assert loss.item() == pytest.approx((1.5 + 0.8 + 1.5 + 0.8) / 4) and clipped.item() == 2
    # clip-higher: eps_high = 0.6 lets ratio 1.5 through for a positive advantage
    loss, _ = grpo.grpo_loss(
        logprobs=logprobs,
        old_logprobs=old,
        advantages=torch.tensor([1.0]),
        mask=mask,
        eps_low=0.2,
        eps_high=0.6,
        beta=0.0,
        kl=zero,
        **kw,
    )
    assert loss.item() == pytest.approx(-(1.5 + 0.5 + 1.5 + 0.5) / 4)


def test_kl_penalty_enters_the_loss_with_beta():
    logprobs = torch.log(torch.tensor([[0.5]]))
    ref = torch.log(torch.tensor([[0.25]]))
    k3 = grpo.kl_estimate(logprobs, ref, "k3")
    assert k3.item() == pytest.approx(0.5 - math.log(0.5) - 1)  # pi_ref/pi = 0.5
    loss, _ = grpo.grpo_loss(
        logprobs=logprobs,
        old_logprobs=logprobs,
        advantages=torch.tensor([0.0]),
        mask=torch.ones(1, 1),
        eps_low=0.2,
        eps_high=0.2,
        beta=0.1,
        kl=k3,
        mode="token-mean",
        n_sequences=1,
        n_tokens=1,
        max_new_tokens=1,
    )
    assert loss.item() == pytest.approx(0.1 * k3.item())


def test_kl_estimators_against_the_exact_kl_of_a_tiny_model(painter):
    """k1 and k3 are unbiased for KL(pi || pi_ref) on samples from pi; k2's mean is E[(log ratio)^2] / 2."""
    model, tokenizer = painter
    torch.manual_seed(0)
    prompt = torch.tensor([encode_prompt(tokenizer, p) for p in eval_prompts(4)])
    with torch.no_grad():
        # (4, V): next-token distributions
        logits = model(prompt).logits[:, -1]
        log_p = torch.log_softmax(logits.double(), -1)
        # a nearby pi_ref
        log_q = torch.log_softmax(logits.double() + 0.5 * torch.randn_like(logits.double()), -1)
        # summed over the whole vocabulary
        exact_kl = (log_p.exp() * (log_p - log_q)).sum(-1)
        exact_half_sq = (log_p.exp() * 0.5 * (log_p - log_q) ** 2).sum(-1)
        samples = torch.multinomial(log_p.exp(), 200_000, replacement=True)  # (4, S) tokens from pi
        lp, lq = log_p.gather(1, samples), log_q.gather(1, samples)
    for kind, target in [("k1", exact_kl), ("k3", exact_kl), ("k2", exact_half_sq)]:
        values = grpo.kl_estimate(lp, lq, kind)
        standard_error = values.std(1) / math.sqrt(values.shape[1])
        assert ((values.mean(1) - target).abs() < 5 * standard_error).all(), kind  # within 5 standard errors
    k2 = grpo.kl_estimate(lp, lq, "k2").mean(1)
    assert ((k2 - exact_kl).abs() > 0.01 * exact_kl).any()  # k2 is not an unbiased estimate of the KL
    assert (grpo.kl_estimate(lp, lq, "k3") >= 0).all()


def test_gspo_with_one_token_per_sequence_is_grpo():
    """One token per completion: the geometric mean of one ratio is that ratio, so GSPO's loss and gradient
    are GRPO's, off-policy and clipped too. The padding's log ratios differ: a mean with them would not."""
    torch.manual_seed(2)
    logits = torch.randn(6, 3, 7, requires_grad=True)
    tokens = torch.randint(0, 7, (6, 3))
    mask = torch.tensor([[1.0, 0.0, 0.0]] * 6)  # completions of one token (its stop token), then padding
    # log pi - log pi_old: the token's (ratios 0.55 to 1.65), and other values in the two padding slots
    shift = torch.tensor([0.5, -0.1, 0.3, -0.6, 0.05, 0.2])[:, None] + torch.tensor([0.0, 0.7, -0.9])
    old = grpo.token_logprobs(logits, tokens, 1.0).detach() - shift
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0])
    for mode in ["seq-mean", "token-mean", "constant"]:
        results = []
        for level in ["token", "sequence"]:
            logits.grad = None
            loss, clipped = grpo.grpo_loss(
                logprobs=grpo.token_logprobs(logits, tokens, 1.0),
                old_logprobs=old,
                advantages=advantages,
                mask=mask,
                eps_low=0.2,
                eps_high=0.2,
                beta=0.0,
                kl=torch.zeros(6, 3),
                level=level,
                mode=mode,
                n_sequences=6,
                n_tokens=6,
                max_new_tokens=3,
            )
            loss.backward()
            results.append((loss.item(), clipped.item(), logits.grad.clone()))
        (token_loss, token_clipped, token_grad), (seq_loss, seq_clipped, seq_grad) = results
        assert token_clipped == seq_clipped >= 2  # the clip binds on both sides here
        assert seq_loss == pytest.approx(token_loss, abs=1e-6)
        assert torch.allclose(seq_grad, token_grad, atol=1e-7)


def surrogate_by_hand(logprobs, advantages, eps_low, eps_high, **kw):
    """grpo_loss against old log-probs of 0 (rho = pi), one sequence of three slots, the last one padding."""
    defaults = dict(old_logprobs=torch.zeros(1, 3), mask=torch.tensor([[1.0, 1.0, 0.0]]), beta=0.0)
    defaults.update(kl=torch.zeros(1, 3), mode="seq-mean", n_sequences=1, n_tokens=2, max_new_tokens=3)
    return grpo.grpo_loss(
        logprobs=logprobs, advantages=advantages, eps_low=eps_low, eps_high=eps_high, **{**defaults, **kw}
    )


def test_gspo_clips_the_geometric_mean_of_the_ratios_by_hand():
    # token ratios 1.44 and 1.0 (9.0 in the padding): s = sqrt(1.44 * 1.0) = 1.2, one ratio for both tokens
    logprobs = torch.log(torch.tensor([[1.44, 1.0, 9.0]])).requires_grad_()
    A = torch.tensor([1.0])
    # inside [0.7, 1.3]: the loss is -s A, and d(-s)/d log pi_t = -s / |o| = -0.6 on each real token
    loss, clipped = surrogate_by_hand(logprobs, A, 0.3, 0.3, level="sequence")
    (grad,) = torch.autograd.grad(loss, logprobs)
    assert loss.item() == pytest.approx(-1.2) and clipped.item() == 0
    assert grad.tolist()[0] == pytest.approx([-0.6, -0.6, 0.0])
    # GRPO on the same tokens: 1.44 is clipped to 1.3 (no gradient), 1.0 is not: -(1.3 + 1.0) / 2
    loss, clipped = surrogate_by_hand(logprobs, A, 0.3, 0.3, level="token")
    (grad,) = torch.autograd.grad(loss, logprobs)
    assert loss.item() == pytest.approx(-1.15) and clipped.item() == 1
    assert grad.tolist()[0] == pytest.approx([0.0, -0.5, 0.0])
    # GSPO's range is tight (the paper's 3e-4, 4e-4): 1 + 0.1 clips the sequence, both tokens, no gradient
    loss, clipped = surrogate_by_hand(logprobs, A, 0.1, 0.1, level="sequence")
    (grad,) = torch.autograd.grad(loss, logprobs)
    assert loss.item() == pytest.approx(-1.1) and clipped.item() == 2 and not grad.any()
    # a negative advantage: s = 1.2 is below 1 + 0.3, so min(s A, clip(s) A) = -1.2: the loss is +1.2
    loss, _ = surrogate_by_hand(logprobs, -A, 0.3, 0.3, level="sequence")
    assert loss.item() == pytest.approx(1.2)


def test_cispo_caps_and_detaches_the_weight_by_hand():
    # ratios 1.5, 0.5, 6.0 (old log-probs 0), A = 2, the cap 1 + 4 = 5 (ScaleRL's 5.0), token-mean over 3
    ratios = torch.tensor([[1.5, 0.5, 6.0]])
    logprobs = torch.log(ratios).requires_grad_()
    kw = dict(mask=torch.ones(1, 3), mode="token-mean", n_tokens=3, policy_loss="cispo")
    loss, clipped = surrogate_by_hand(logprobs, torch.tensor([2.0]), 0.2, 4.0, **kw)
    weights = [1.5, 0.5, 5.0]  # no lower bound: 0.5 stays 0.5; 6.0 is capped at 5
    expected = -2 / 3 * sum(w * math.log(r) for w, r in zip(weights, [1.5, 0.5, 6.0]))  # -A w log pi
    assert loss.item() == pytest.approx(expected)
    assert clipped.item() == 1
    (grad,) = torch.autograd.grad(loss, logprobs)
    # sg(weight): the gradient is -A w / 3 for every token, the capped one included (no w' log pi term)
    assert grad.tolist()[0] == pytest.approx([-2 / 3 * w for w in weights])
    # a capped weight is counted whatever the advantage's sign (TRL's cispo_clip_ratio counts A > 0 only)
    assert surrogate_by_hand(logprobs, torch.tensor([-2.0]), 0.2, 4.0, **kw)[1].item() == 1
    # the clipped surrogate with eps 0.2 drops the first and last tokens' gradients (ratio > 1.2, A > 0)
    kw["policy_loss"] = "clip"
    loss, clipped = surrogate_by_hand(logprobs, torch.tensor([2.0]), 0.2, 0.2, **kw)
    (grad,) = torch.autograd.grad(loss, logprobs)
    assert clipped.item() == 2 and grad.tolist()[0] == pytest.approx([0.0, -2 / 3 * 0.5, 0.0])


class OneRank:
    """Run.all_gather in a world of `world` ranks, each of the others holding `others` groups."""

    def __init__(self, world=1, others=0):
        self.world, self.others = world, others

    def all_gather(self, x):
        return torch.cat([x] + [torch.tensor([self.others])] * (self.world - 1))


def batch_of(rewards: list[list[float]], P: int, T: int, first_id: int) -> tuple:
    """A fake rollout: a group per row of rewards; prompt and completion ids numbered from first_id."""
    b, G = len(rewards), len(rewards[0])
    prompt_ids = torch.arange(first_id, first_id + b)[:, None].repeat(1, P)
    completion_ids = torch.arange(first_id, first_id + b * G)[:, None].repeat(1, T)
    ones = torch.ones(b * G, T)
    prompt_mask, truncated = torch.ones(b, P, dtype=torch.long), torch.zeros(b * G, dtype=torch.bool)
    return prompt_ids, prompt_mask, completion_ids, ones, truncated, torch.tensor(rewards).view(-1)


def test_dynamic_sampling_keeps_groups_whose_rewards_differ_and_pads_the_rounds_by_hand():
    rounds = iter([batch_of([[1.0, 1.0], [0.7, 0.7]], P=2, T=5, first_id=20),
                   batch_of([[0.0, 0.5], [1.0, 1.0]], P=4, T=2, first_id=30)])  # fmt: skip
    first = batch_of([[0.0, 1.0], [0.3, 0.3]], P=3, T=3, first_id=10)  # group 0 kept, group 1 dropped
    sampled, n_rounds, dropped = grpo.dynamic_sampling(lambda: next(rounds), first, B=2, G=2, max_rounds=4,
                                                       run=OneRank())  # fmt: skip
    prompt_ids, prompt_mask, completion_ids, completion_mask, truncated, rewards = sampled
    assert n_rounds == 3 and dropped == 4  # round 2 keeps none; round 3 fills the batch
    assert rewards.tolist() == [0.0, 1.0, 0.0, 0.5]
    # prompts left padded to the longest of the rounds (4), completions right padded to the longest (5)
    assert prompt_ids.tolist() == [[0, 10, 10, 10], [30, 30, 30, 30]]
    assert prompt_mask.tolist() == [[0, 1, 1, 1], [1, 1, 1, 1]]
    assert completion_ids.tolist() == [[10, 10, 10, 0, 0], [11, 11, 11, 0, 0], [30, 30, 0, 0, 0],
                                       [31, 31, 0, 0, 0]]  # fmt: skip
    assert completion_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 0, 0, 0]]
    # equal rewards are equal, whatever rounding makes of their std (float32 [0.9] * 3 has std 7e-8, not 0)
    equal = batch_of([[0.9, 0.9, 0.9]], P=1, T=1, first_id=0)
    assert equal[-1].std() > 0
    sampled, n_rounds, dropped = grpo.dynamic_sampling(lambda: equal, equal, 1, 3, 2, run=OneRank())
    assert len(sampled[0]) == 0 and n_rounds == 2 and dropped == 2


def test_dynamic_sampling_keeps_as_many_groups_on_every_rank():
    """DDP: each rank trains on the fewest groups any rank kept, so every rank has the same whole groups."""
    varied = batch_of([[0.0, 1.0], [0.0, 1.0]], P=1, T=1, first_id=0)
    equal = batch_of([[0.0, 0.0], [1.0, 1.0]], P=1, T=1, first_id=0)
    # this rank has its 2 groups at once, the other rank has 1: both go on, up to max_rounds, then keep 1
    sampled, n_rounds, dropped = grpo.dynamic_sampling(lambda: equal, varied, B=2, G=2, max_rounds=3,
                                                       run=OneRank(world=2, others=1))  # fmt: skip
    assert n_rounds == 3 and len(sampled[0]) == 1 and len(sampled[5]) == 2
    assert dropped == 3 * 2 * 2 - (2 + 1)  # sampled: rounds x B x ranks; kept: 2 here, 1 there
    # the other rank full as well: one round
    sampled, n_rounds, _ = grpo.dynamic_sampling(lambda: equal, varied, B=2, G=2, max_rounds=3,
                                                 run=OneRank(world=2, others=2))  # fmt: skip
    assert n_rounds == 1 and len(sampled[0]) == 2


def test_completion_mask_stops_at_the_first_eos_even_when_pad_is_eos():
    eos = 2
    ids = torch.tensor([[5, 6, eos, eos, eos], [5, eos, 7, eos, eos], [5, 6, 7, 8, 9]])
    mask, truncated = grpo.completion_mask_from(ids, eos)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert truncated.tolist() == [False, False, True]


def test_training_logprobs_equal_the_samplers(painter):
    """Same temperature, dropout off, left padding: recomputed log-probs match generation's to 1e-5 (fp32)."""
    model, tokenizer = painter
    temperature = 0.7
    prompts = ["Name this paint color: #d48475", "Name this paint color: #1f4e79"]
    encoded = tokenizer.pad(
        {"input_ids": [encode_prompt(tokenizer, p) for p in prompts] + [[1, 5]]},
        padding=True,
        return_tensors="pt",
    )  # a shorter third prompt forces left padding
    torch.manual_seed(0)
    out = model.generate(
        **encoded,
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=6,
        pad_token_id=tokenizer.pad_token_id,
        output_scores=True,
        return_dict_in_generate=True,
    )
    P = encoded["input_ids"].shape[1]
    completion_ids = out.sequences[:, P:]
    sampler = (
        torch.stack([torch.log_softmax(s, -1) for s in out.scores], 1)
        .gather(-1, completion_ids[..., None])
        .squeeze(-1)
    )
    mask, _ = grpo.completion_mask_from(completion_ids, tokenizer.eos_token_id)
    with torch.no_grad():
        trainer, _ = grpo.forward_logprobs(
            model, encoded["input_ids"], encoded["attention_mask"], completion_ids, mask, temperature
        )
    assert mask.sum() >= 4 and ((trainer - sampler).abs() * mask).max() < 1e-5


def tiny_args(tmp_path, **overrides) -> grpo.Args:
    base = dict(
        output_dir=str(tmp_path),
        total_steps=2,
        batch_size=2,
        group_size=4,
        micro_batch_size=4,
        eval_every=2,
        eval_size=8,
        log_every=1,
        judge="correct",
        max_new_tokens=6,
    )
    return grpo.Args(**{**base, **overrides})


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"beta": 0.0, "loss_agg": "token-mean", "scale_rewards": "batch", "micro_batch_size": 64},
        {
            "num_iterations": 2,
            "kl_estimator": "k1",
            "mask_truncated": True,
            "loss_agg": "constant",
            "max_new_tokens": 2,
        },
        {"num_iterations": 2, "importance_sampling_level": "sequence", "policy_loss": "cispo"},
        {"dynamic_sampling": True, "judge": "correct+overlong:6:3", "micro_batch_size": 2},
    ],
)
def test_main_runs_and_logs_the_shared_metrics(tmp_path, overrides):
    final = grpo.main(tiny_args(tmp_path, **overrides))
    lines = [json.loads(l) for l in open(os.path.join(final["run_dir"], "metrics.jsonl"))]
    train = [m for m in lines if "train/loss" in m]
    assert len(train) == 2 and [m["step"] for m in lines if "eval/reward" in m] == [0, 2]
    for key in [
        "train/reward",
        "train/frac_zero_std",
        "train/clipfrac",
        "train/grad_norm",
        "train/completion_len",
        "train/entropy",
    ]:
        assert all(math.isfinite(m[key]) for m in train), key
    assert ("train/kl" in train[0]) == (overrides.get("beta", 0.04) > 0)
    assert os.path.exists(os.path.join(final["run_dir"], "model", "model.safetensors"))


def test_dynamic_sampling_never_trains_on_a_group_of_equal_rewards(tmp_path, monkeypatch):
    """A judge that scores half the hexes the same whatever the name: their groups are dropped, more prompts
    are sampled, and group_advantages never sees a row of equal rewards; the counts are logged."""

    def judge(prompts, completions, **kwargs):
        return [float(len(c)) if p[-1] in "01234567" else 0.5 for p, c in zip(prompts, completions)]

    seen = []

    def group_advantages(rewards, scale, eps=1e-4):
        seen.append(rewards.clone())
        return real_group_advantages(rewards, scale, eps)

    real_group_advantages = grpo.group_advantages
    monkeypatch.setattr(grpo, "get_judge", lambda spec, device, prompts=None: judge)
    monkeypatch.setattr(grpo, "group_advantages", group_advantages)
    args = tiny_args(tmp_path, dynamic_sampling=True, max_sampling_rounds=3, total_steps=4, eval_every=4)
    final = grpo.main(args)
    assert seen and all((r.max(1).values > r.min(1).values).all() for r in seen)
    assert all(r.shape[1] == 4 and 1 <= r.shape[0] <= 2 for r in seen)
    lines = open(os.path.join(final["run_dir"], "metrics.jsonl")).readlines()
    train = [json.loads(line) for line in lines if "train/loss" in line]
    assert len(train) == len(seen) and all(m["train/frac_zero_std"] == 0 for m in train)
    assert sum(m["train/dropped_groups"] for m in train) > 0
    assert any(m["train/extra_rounds"] > 0 for m in train)


def test_dynamic_sampling_makes_no_update_when_no_group_has_a_signal(tmp_path, monkeypatch):
    """Every reward equal: each step samples --max-sampling-rounds batches, keeps none, logs its counts and
    leaves the weights as they were."""
    judge = lambda prompts, completions, **kwargs: [1.0] * len(completions)  # noqa: E731
    monkeypatch.setattr(grpo, "get_judge", lambda spec, device, prompts=None: judge)
    final = grpo.main(tiny_args(tmp_path, dynamic_sampling=True, max_sampling_rounds=2, total_steps=2))
    rows = [json.loads(line) for line in open(os.path.join(final["run_dir"], "metrics.jsonl"))]
    steps = [r for r in rows if "train/extra_rounds" in r]
    counts = [(r["step"], r["train/extra_rounds"], r["train/dropped_groups"]) for r in steps]
    assert counts == [(1, 1, 4), (2, 1, 4)]  # each step: 2 batches of 2 groups, all dropped
    assert not any("train/loss" in r for r in rows)
    start = saved_weights(os.path.join(ROOT, "common", "painter"))
    end = saved_weights(os.path.join(final["run_dir"], "model"))
    assert all(torch.equal(start[k], end[k]) for k in start)


def test_main_takes_a_prompts_file_and_passes_answers_to_the_judge(tmp_path, monkeypatch, painter):
    seen = {"answer": [], "ids": []}

    def judge(prompts, completions, answer, completion_ids, **kwargs):
        seen["answer"] += answer
        seen["ids"] += list(zip(completions, completion_ids))
        return [float(len(c)) for c in completions]

    monkeypatch.setattr(grpo, "get_judge", lambda spec, device, prompts=None: judge)
    path = tmp_path / "prompts.jsonl"
    path.write_text(
        "".join(
            json.dumps({"prompt": f"Name this paint color: #{h}", "answer": h}) + "\n"
            for h in ["aa0000", "00aa00", "0000aa"]
        )
    )
    grpo.main(tiny_args(tmp_path, prompts=str(path), total_steps=1, eval_every=1))
    assert sorted(set(seen["answer"])) == [
        "0000aa",
        "00aa00",
        "aa0000",
    ]  # training and held-out rows' answers
    # TRL's completion_ids: each completion's tokens through its stop token, in training and in the eval
    _, tokenizer = painter
    stops = set(grpo.sampling_config(tokenizer, painter[0], 1.0, 6).eos_token_id)
    for text, ids in seen["ids"]:
        assert tokenizer.decode(ids, skip_special_tokens=True).strip() == text
        assert (ids[-1] in stops or len(ids) == 6) and not stops & set(ids[:-1])


@pytest.mark.parametrize(
    "judge_output, message",
    [
        ("[0.0] * (len(completions) - 1)", "returned 7 scores for 8 completions"),
        ("[float('nan')] * len(completions)", "8 non-finite"),
    ],
)
def test_a_bad_judge_is_a_clear_error(tmp_path, judge_output, message):
    (tmp_path / "bad.py").write_text(f"def fn(prompts, completions, **kwargs):\n    return {judge_output}\n")
    with pytest.raises(ValueError, match=message):
        grpo.main(tiny_args(tmp_path, judge=f"{tmp_path / 'bad.py'}:fn"))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--group-size", "1"], "at least 2 completions"),
        ("--batch-size 3 --group-size 4 --micro-batch-size 8".split(), "must divide"),
        (["--prompts", "missing.jsonl"], "does not exist"),
    ],
)
def test_cli_bad_input_is_one_line(flags, message):
    assert_one_line_error(run_script("grpo.py", *flags), message)


def test_the_judge_counts_a_truncated_completions_tokens_before_the_mask_drops_it(tmp_path, monkeypatch):
    """--mask-truncated drops them from the loss after the judge, which sees all their tokens (overlong)."""
    seen = []

    def judge(prompts, completions, completion_ids, truncated=None, **kwargs):
        seen.extend(zip(completion_ids, truncated or [None] * len(completions)))
        return [float(len(c)) for c in completions]

    monkeypatch.setattr(grpo, "get_judge", lambda spec, device, prompts=None: judge)
    grpo.main(tiny_args(tmp_path, max_new_tokens=2, mask_truncated=True, total_steps=1, eval_every=1))
    assert any(t for _, t in seen) and all(len(ids) == 2 for ids, t in seen if t)


def test_cli_runs(tmp_path):
    result = run_script(
        "grpo.py",
        "--group-size",
        "4",
        "--batch-size",
        "2",
        "--micro-batch-size",
        "8",
        "--total-steps",
        "2",
        "--eval-every",
        "2",
        "--eval-size",
        "4",
        "--log-every",
        "1",
        "--output-dir",
        str(tmp_path),
    )
    assert_run_console(result, tmp_path, "train/frac_zero_std")
    assert_help_lists(
        "grpo.py",
        (
            "--scale-rewards --loss-agg --clip-eps-high --num-iterations --kl-estimator --mask-truncated "
            "--importance-sampling-level --policy-loss --dynamic-sampling --max-sampling-rounds overlong"
        ).split(),
    )
