"""reinforce.py: baselines, the KL-shaped reward and the loss by hand; drift of helpers shared with
grpo.py; runs."""

import inspect
import json
import math
import os

import pytest
import torch

import grpo
import reinforce
from conftest import assert_run_console, assert_help_lists, assert_one_line_error, run_script


def test_baselines_by_hand():
    rewards = torch.tensor([[1.0, 2.0, 6.0], [3.0, 3.0, 3.0]])
    rloo, _ = reinforce.baseline_advantages(rewards, "rloo")
    # leave one out: 1 - (2+6)/2 = -3, 2 - (1+6)/2 = -1.5, 6 - (1+2)/2 = 4.5
    assert torch.allclose(rloo, torch.tensor([[-3.0, -1.5, 4.5], [0.0, 0.0, 0.0]]))
    mean, _ = reinforce.baseline_advantages(rewards, "group-mean")
    assert torch.allclose(mean, torch.tensor([[-2.0, -1.0, 3.0], [0.0, 0.0, 0.0]]))
    none, _ = reinforce.baseline_advantages(rewards, "none")
    assert torch.equal(none, rewards)


def test_rloo_is_g_over_g_minus_1_times_the_mean_baseline():
    torch.manual_seed(0)
    rewards = torch.randn(5, 8)
    rloo, _ = reinforce.baseline_advantages(rewards, "rloo")
    assert torch.allclose(rloo, 8 / 7 * (rewards - rewards.mean(1, keepdim=True)), atol=1e-6)


def test_moving_average_baseline_uses_only_past_batches():
    first, state = reinforce.baseline_advantages(
        torch.tensor([[1.0, 3.0]]), "moving-average", None, decay=0.5
    )
    # no past batch yet: no baseline (its own mean would include each reward itself); the mean starts there
    assert torch.allclose(first, torch.tensor([[1.0, 3.0]])) and state == pytest.approx(2.0)
    second, state = reinforce.baseline_advantages(
        torch.tensor([[10.0, 10.0]]), "moving-average", state, decay=0.5
    )
    assert torch.allclose(second, torch.tensor([[8.0, 8.0]])) and state == pytest.approx(0.5 * 2 + 0.5 * 10)


def test_kl_penalty_is_k1_summed_over_the_completion():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0]])
    ref = torch.tensor([[-1.5, -1.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the third token is padding
    assert reinforce.kl_penalty(logprobs, ref, mask).item() == pytest.approx(0.5 + -1.0)


def test_reinforce_loss_by_hand_and_its_gradient():
    logprobs = torch.tensor([[-1.0, -2.0], [-0.5, -4.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    advantages = torch.tensor([2.0, -1.0])
    loss = reinforce.reinforce_loss(logprobs=logprobs, advantages=advantages, mask=mask, n_sequences=2)
    assert loss.item() == pytest.approx(-(2.0 * (-3.0) + -1.0 * (-0.5)) / 2)
    loss.backward()  # d loss / d log pi_it = -A_i / N on real tokens, 0 on padding
    assert torch.allclose(logprobs.grad, torch.tensor([[-1.0, -1.0], [0.5, 0.0]]))


def test_micro_batches_give_the_full_batch_gradient():
    torch.manual_seed(0)
    logits = torch.randn(6, 4, 9, requires_grad=True)
    tokens = torch.randint(0, 9, (6, 4))
    mask = (torch.arange(4)[None] < torch.tensor([4, 1, 2, 3, 4, 2])[:, None]).float()
    advantages = torch.randn(6)

    def gradient(chunks):
        logits.grad = None
        for s in torch.arange(6).split(chunks):
            reinforce.reinforce_loss(
                logprobs=reinforce.token_logprobs(logits[s], tokens[s], 1.0),
                advantages=advantages[s],
                mask=mask[s],
                n_sequences=6,
            ).backward()
        return logits.grad.clone()

    assert torch.allclose(gradient(6), gradient(4), atol=1e-7) and torch.allclose(
        gradient(6), gradient(1), atol=1e-7
    )


@pytest.mark.parametrize("name", ["token_logprobs", "entropy", "completion_mask_from", "forward_logprobs"])
def test_helpers_shared_with_grpo_are_identical_copies(name):
    assert inspect.getsource(getattr(reinforce, name)) == inspect.getsource(getattr(grpo, name))


def tiny_args(tmp_path, **overrides) -> reinforce.Args:
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
    return reinforce.Args(**{**base, **overrides})


@pytest.mark.parametrize("baseline", ["rloo", "group-mean", "moving-average", "none"])
def test_main_runs_with_each_baseline(tmp_path, baseline):
    final = reinforce.main(tiny_args(tmp_path, baseline=baseline, beta=0.0 if baseline == "none" else 0.05))
    lines = [json.loads(l) for l in open(os.path.join(final["run_dir"], "metrics.jsonl"))]
    train = [m for m in lines if "train/loss" in m]
    assert len(train) == 2 and all(
        math.isfinite(m["train/loss"]) and math.isfinite(m["train/grad_norm"]) for m in train
    )
    assert ("train/kl" in train[0]) == (baseline != "none") and "train/clipfrac" not in train[0]
    assert os.path.exists(os.path.join(final["run_dir"], "model", "model.safetensors"))


def test_group_baselines_need_two_completions(tmp_path):
    with pytest.raises(ValueError, match="at least 2 completions"):
        reinforce.main(tiny_args(tmp_path, group_size=1, micro_batch_size=2))
    reinforce.main(
        tiny_args(
            tmp_path,
            group_size=1,
            micro_batch_size=64,
            baseline="moving-average",
            total_steps=1,
            eval_every=1,
        )
    )


def test_the_judge_counts_a_truncated_completions_tokens_before_the_mask_drops_it(tmp_path, monkeypatch):
    """--mask-truncated drops them from the loss after the judge, which sees all their tokens (overlong)."""
    seen = []

    def judge(prompts, completions, completion_ids, truncated=None, **kwargs):
        seen.extend(zip(completion_ids, truncated or [None] * len(completions)))
        return [float(len(c)) for c in completions]

    monkeypatch.setattr(reinforce, "get_judge", lambda spec, device, prompts=None: judge)
    reinforce.main(tiny_args(tmp_path, max_new_tokens=2, mask_truncated=True, total_steps=1, eval_every=1))
    assert any(t for _, t in seen) and all(len(ids) == 2 for ids, t in seen if t)


def test_cli_runs(tmp_path):
    result = run_script(
        "reinforce.py",
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
    assert_run_console(result, tmp_path, "train/reward")
    assert_one_line_error(run_script("reinforce.py", "--group-size", "1"), "at least 2 completions")
    assert_help_lists("reinforce.py", ["--baseline", "--baseline-decay", "--beta", "--mask-truncated"])
