"""ppo_rlhf.py: GAE, per-token rewards, the EOS trick, both clipped losses, whitening and the KL controller by
hand; values read at the right positions; drift of helpers shared with grpo.py and reward_model.py; runs with
a judge and with a reward model; bad input."""

import inspect
import json
import math
import os
import shutil

import pytest
import torch

import grpo
import ppo_rlhf as ppo
import reward_model as rm
from common.models import encode_completion, encode_prompt, load_model_and_tokenizer
from conftest import assert_run_console, assert_one_line_error, run_script


# ---- GAE ---------------------------------------------------------------------------------------------------


def test_gae_by_hand_on_four_tokens():
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0], [0.2, 1.0, 9.0, 9.0]])
    values = torch.tensor([[0.5, 0.4, 0.8, 0.6], [0.3, 0.5, 7.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])  # row 2: two real tokens, then padding
    advantages, returns = ppo.gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # row 1, backwards: d3 = 1 + 0 - .6 = .4 -> A3 = .4;  d2 = .6 - .8 = -.2 -> A2 = -.2 + .5 * .4 = 0
    # d1 = .8 - .4 = .4 -> A1 = .4 + 0 = .4;  d0 = .4 - .5 = -.1 -> A0 = -.1 + .5 * .4 = .1 row 2 (padding's
    # rewards and values are ignored): d1 = 1 - .5 = .5;  d0 = .2 + .5 - .3 = .4 -> A0 = .4 + .25
    assert torch.allclose(advantages, torch.tensor([[0.1, 0.4, 0.0, 0.4], [0.65, 0.5, 0.0, 0.0]]))
    assert torch.allclose(returns, torch.tensor([[0.6, 0.8, 0.8, 1.0], [0.95, 1.0, 0.0, 0.0]]))
    # gamma = .5, lambda = 1: A_t = discounted return - V_t, e.g. A0 = .5^3 * 1 - .5 = -.375
    advantages, _ = ppo.gae(rewards[:1], values[:1], mask[:1], gamma=0.5, lam=1.0)
    assert torch.allclose(advantages, torch.tensor([[-0.375, -0.15, -0.3, 0.4]]))


def test_gae_matches_a_plain_loop_on_random_inputs():
    torch.manual_seed(0)
    rewards, values = torch.randn(7, 6), torch.randn(7, 6)
    lengths = [6, 1, 3, 0, 5, 2, 6]
    mask = (torch.arange(6)[None] < torch.tensor(lengths)[:, None]).float()
    advantages, returns = ppo.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    for i, n in enumerate(lengths):
        expected = [0.0] * 6
        running = 0.0
        for t in reversed(range(n)):
            next_value = values[i, t + 1].item() if t + 1 < n else 0.0
            running = rewards[i, t].item() + 0.9 * next_value - values[i, t].item() + 0.9 * 0.8 * running
            expected[t] = running
        assert advantages[i].tolist() == pytest.approx(expected, abs=1e-5)
        assert returns[i, :n].tolist() == pytest.approx(
            [a + v for a, v in zip(expected, values[i, :n].tolist())], abs=1e-5
        )


# ---- per-token rewards and the EOS trick -------------------------------------------------------------------


def test_per_token_rewards_put_the_score_on_the_last_real_token_and_kl_on_every_token():
    eos = 2
    # ends at EOS, truncated, only EOS
    completion_ids = torch.tensor([[7, 8, eos, 0], [7, 8, 9, 9], [eos, 0, 0, 0]])
    completion_mask, truncated = ppo.completion_mask_from(completion_ids, eos)
    assert truncated.tolist() == [False, True, False]
    logprobs = torch.tensor([[-1.0, -2.0, -0.5, -9.0]] * 3)
    ref_logprobs = torch.tensor([[-1.5, -1.0, -0.5, -1.0]] * 3)  # k1 = [.5, -1, 0, -8]
    scores = torch.tensor([2.0, 3.0, 5.0])
    rewards, non_score = ppo.per_token_rewards(scores, logprobs, ref_logprobs, completion_mask, kl_coef=0.1)
    assert torch.allclose(
        rewards,
        torch.tensor(
            [
                [-0.05, 0.1, 2.0, 0.0],  # score on EOS; padding gets nothing
                # no EOS: score on the last token
                [-0.05, 0.1, 0.0, 3.8],
                [4.95, 0.0, 0.0, 0.0],
            ]
        ),
    )  # a lone EOS: KL and score on it
    assert torch.allclose(non_score.sum(1), torch.tensor([0.05, 0.85, -0.05]))
    # a masked row (--truncated mask) gets neither score nor KL
    masked = completion_mask * (~truncated)[:, None]
    rewards, _ = ppo.per_token_rewards(scores, logprobs, ref_logprobs, masked, kl_coef=0.1)
    assert rewards[1].abs().sum() == 0 and rewards[0, 2] == pytest.approx(2.0)


def test_the_eos_trick_penalises_only_completions_without_eos():
    scores, truncated = torch.tensor([0.7, 0.2, -0.3]), torch.tensor([False, True, False])
    assert ppo.sequence_scores(scores, truncated, "penalty", -1.0).tolist() == pytest.approx(
        [0.7, -1.0, -0.3]
    )
    assert ppo.sequence_scores(scores, truncated, "mask", -1.0).tolist() == pytest.approx([0.7, 0.2, -0.3])
    assert ppo.sequence_scores(scores, truncated, "none", -1.0).tolist() == pytest.approx([0.7, 0.2, -0.3])


# ---- losses, whitening, KL controller ----------------------------------------------------------------------


def test_policy_loss_by_hand_and_its_gradient():
    ratio = torch.tensor([[1.5, 0.5, 1.1, 0.5, 3.0]])
    logprobs = ratio.log().requires_grad_(True)
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])  # the last token is padding
    loss, clipfrac = ppo.policy_loss(
        logprobs=logprobs, old_logprobs=torch.zeros(1, 5), advantages=advantages, mask=mask, clip_eps=0.2
    )
    # max(-A rho, -A clip(rho)): max(-1.5, -1.2) = -1.2 (clip)  max(-.5, -.8) = -.5  max(1.1, 1.1) = 1.1
    # max(.5, .8) = .8 (clip)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.1 + 0.8) / 4) and clipfrac.item() == pytest.approx(
        0.5
    )
    # d(-A rho)/d log pi = -A rho on unclipped tokens, 0 where the clip is active and on padding
    loss.backward()
    assert torch.allclose(logprobs.grad, torch.tensor([[0.0, -0.5 / 4, 1.1 / 4, 0.0, 0.0]]))


def test_value_loss_by_hand():
    values = torch.tensor([[0.5, -0.1, 0.3, 50.0]], requires_grad=True)
    old_values, returns = torch.zeros(1, 4), torch.tensor([[1.0, 1.0, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, clipfrac = ppo.value_loss(
        values=values, old_values=old_values, returns=returns, mask=mask, value_clip=0.2
    )
    # token 0: V clipped to .2: max(.25, .64) = .64 (clip binds)   token 1: 1.21   token 2: max(1.69, 1.44) =
    # 1.69
    assert loss.item() == pytest.approx(0.5 * (0.64 + 1.21 + 1.69) / 3) and clipfrac.item() == pytest.approx(
        1 / 3
    )
    loss.backward()  # where the clipped term wins, V gets no gradient
    assert torch.allclose(values.grad, torch.tensor([[0.0, -1.1 / 3, 1.3 / 3, 0.0]]))


def test_masked_whitening_ignores_padding():
    x, mask = torch.tensor([[2.0, 4.0], [6.0, 100.0]]), torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    # mean 4, unbiased variance ((-2)^2 + 0 + 2^2) / 2 = 4, std 2
    assert torch.allclose(ppo.masked_whiten(x, mask), torch.tensor([[-1.0, 0.0], [1.0, 0.0]]), atol=1e-6)
    assert torch.allclose(
        ppo.masked_whiten(x, mask, shift_mean=False), torch.tensor([[3.0, 4.0], [5.0, 0.0]]), atol=1e-6
    )


def test_adaptive_kl_controller_moves_beta_towards_the_target():
    assert ppo.adaptive_kl_coef(0.1, kl=6.0, target=6.0, n_episodes=100, horizon=10000) == pytest.approx(0.1)
    # e clipped to .2
    assert ppo.adaptive_kl_coef(0.1, kl=60.0, target=6.0, n_episodes=100, horizon=10000) == pytest.approx(
        0.1 * 1.002
    )
    # e = -.1
    assert ppo.adaptive_kl_coef(0.1, kl=5.4, target=6.0, n_episodes=100, horizon=10000) == pytest.approx(
        0.1 * (1 - 0.1 * 0.01)
    )


# ---- values at the policy's positions ----------------------------------------------------------------------


def test_the_controllers_kl_averages_over_the_rows_that_train():
    logprobs = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5], [-3.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.5, -9.0], [-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]])
    # row 0: two real tokens; row 1: masked out whole (--truncated mask); row 2: one real token
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    kl_sum, n_rows = ppo.trained_rows_kl(logprobs, ref, mask)
    # (0.5 + 0.5) + (-2.0) over 2 rows = -0.5 nats per completion; over all 3 rows it would be -1/3
    assert float(kl_sum) == pytest.approx(-1.0) and int(n_rows) == 2


def test_values_are_read_at_the_state_before_each_token_whatever_the_padding():
    torch.manual_seed(0)
    value_model, tokenizer = load_model_and_tokenizer(scalar_head=True)
    torch.nn.init.normal_(value_model.score.weight, std=1.0)
    short, long = (encode_prompt(tokenizer, f"Name this paint color: #{h}") for h in ("d48475", "1f4e79"))
    long = long + encode_prompt(tokenizer, "Name")  # a longer prompt, so the other row is left padded
    completion = encode_completion(tokenizer, "Name this paint color: #d48475", "Sunset Dust")
    P = len(long)
    input_ids = torch.tensor([[0] * (P - len(short)) + short + completion, long + completion])
    attention_mask = torch.tensor(
        [[0] * (P - len(short)) + [1] * (len(short) + len(completion)), [1] * (P + len(completion))]
    )
    values = ppo.forward_values(value_model, input_ids, attention_mask, P)  # (2, T)
    for row, prompt in enumerate((short, long)):  # V(s_t) is the head on the prefix prompt + completion[:t]
        for t in range(len(completion)):
            # the prefix as a prompt of all but its last token, and a "completion" of the rest
            head, tail = prompt[:-1], prompt[-1:] + completion[:t]
            ones = torch.ones(1, len(head), dtype=torch.long), torch.ones(1, len(tail))
            expected = ppo.score_last_token(
                value_model, torch.tensor([head]), ones[0], torch.tensor([tail]), ones[1]
            )
            assert values[row, t].item() == pytest.approx(expected.item(), abs=1e-4)


@pytest.mark.parametrize("name", ["token_logprobs", "entropy", "completion_mask_from", "forward_logprobs"])
def test_helpers_shared_with_grpo_are_identical_copies(name):
    assert inspect.getsource(getattr(ppo, name)) == inspect.getsource(getattr(grpo, name))


def test_score_last_token_is_an_identical_copy_of_reward_models():
    assert inspect.getsource(ppo.score_last_token) == inspect.getsource(rm.score_last_token)


# ---- runs --------------------------------------------------------------------------------------------------


def tiny_args(tmp_path, **overrides) -> ppo.Args:
    base = dict(
        output_dir=str(tmp_path),
        total_steps=2,
        batch_size=4,
        num_minibatches=2,
        num_ppo_epochs=2,
        eval_every=2,
        eval_size=8,
        log_every=1,
        judge="correct",
        max_new_tokens=6,
    )
    return ppo.Args(**{**base, **overrides})


def train_lines(run_dir: str) -> list[dict]:
    return [m for m in map(json.loads, open(os.path.join(run_dir, "metrics.jsonl"))) if "train/loss" in m]


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("rm")
    metrics = rm.main(
        rm.Args(
            output_dir=str(out),
            judge="correct",
            num_prompts=24,
            eval_prompts=8,
            batch_size=8,
            num_epochs=1,
            eval_every=10,
            log_every=10,
        )
    )
    return os.path.join(metrics["run_dir"], "model")


@pytest.mark.parametrize(
    "overrides", [{}, {"truncated": "mask", "whiten_rewards": True, "target_kl": 1.0, "kl_horizon": 10}]
)
def test_main_runs_with_a_judge(tmp_path, overrides):
    final = ppo.main(tiny_args(tmp_path, **overrides))
    train = train_lines(final["run_dir"])
    keys = [
        "train/loss",
        "train/value_loss",
        "train/explained_variance",
        "train/approx_kl",
        "train/kl_coef",
        "train/non_score_reward",
        "train/score",
        "train/reward",
        "train/kl",
        "train/clipfrac",
        "train/entropy",
    ]
    assert len(train) == 2 and all(math.isfinite(m[k]) for m in train for k in keys)
    assert train[0]["train/explained_variance"] == 0.0  # the zero value head: V = 0 at the first rollout
    if "target_kl" in overrides:  # beta moved by the controller between the two steps
        assert train[0]["train/kl_coef"] == 0.05 and train[1]["train/kl_coef"] != 0.05
    assert os.path.exists(os.path.join(final["run_dir"], "model", "model.safetensors"))
    assert math.isfinite(final["eval/reward"])


def test_the_judge_gets_each_completions_token_ids_and_whether_it_stopped(tmp_path, monkeypatch):
    """TRL's reward arguments, as grpo.py and reinforce.py pass them: the tokens through the stop token."""
    seen = []

    def judge(prompts, completions, completion_ids, truncated=None, **kwargs):
        seen.extend(zip(completion_ids, truncated or [None] * len(completions)))  # None: the eval's
        return [float(len(c)) for c in completions]

    monkeypatch.setattr(ppo, "get_judge", lambda spec, device, prompts=None: judge)
    ppo.main(tiny_args(tmp_path, max_new_tokens=2, total_steps=1, eval_every=1))
    assert any(t for _, t in seen) and all(len(ids) == 2 for ids, t in seen if t)
    assert all(1 <= len(ids) <= 2 for ids, _ in seen)


def test_main_runs_with_a_reward_model(tmp_path, reward_model_dir):
    final = ppo.main(tiny_args(tmp_path, reward_model=reward_model_dir))
    train = train_lines(final["run_dir"])
    assert len(train) == 2 and all(
        math.isfinite(m["train/value_loss"]) and math.isfinite(m["train/score"]) for m in train
    )
    # the value model starts as the reward model, so its first values are the RM's scores of the prefixes: not
    # 0
    assert train[0]["train/explained_variance"] != 0.0


def test_a_reward_model_with_another_tokenizer_is_refused(tmp_path, reward_model_dir):
    other = tmp_path / "other_rm"
    shutil.copytree(reward_model_dir, other)
    _, tokenizer = load_model_and_tokenizer(str(other), scalar_head=True)
    tokenizer.add_tokens(["vantablack"])
    tokenizer.save_pretrained(str(other))
    with pytest.raises(ValueError, match="different tokenizer.*--judge rm:PATH"):
        ppo.main(tiny_args(tmp_path, reward_model=str(other)))


def test_nan_values_stop_the_run_and_keep_the_last_good_model(tmp_path, monkeypatch):
    monkeypatch.setattr(ppo, "forward_values", lambda *a: torch.full(a[1].shape, float("nan"))[:, a[3] :])
    with pytest.raises(FloatingPointError, match="values or advantages: NaN or inf.*last good model"):
        ppo.main(tiny_args(tmp_path))
    (run,) = os.listdir(tmp_path)
    # saved by the step-0 eval
    assert os.path.exists(os.path.join(tmp_path, run, "model", "model.safetensors"))


def test_cli_runs_and_bad_input_is_one_line(tmp_path):
    result = run_script(
        "ppo_rlhf.py",
        "--batch-size",
        "4",
        "--num-minibatches",
        "2",
        "--num-ppo-epochs",
        "1",
        "--total-steps",
        "2",
        "--eval-every",
        "2",
        "--eval-size",
        "4",
        "--log-every",
        "1",
        "--judge",
        "correct",
        "--output-dir",
        str(tmp_path),
    )
    assert_run_console(result, tmp_path, "train/explained_variance")
    for flags, message in [
        (["--reward-model", "common/painter"], "is not a reward model"),
        (["--reward-model", str(tmp_path / "nowhere")], "is not a directory"),
        (["--batch-size", "4", "--num-minibatches", "3"], "must divide --batch-size"),
    ]:
        assert_one_line_error(
            run_script("ppo_rlhf.py", *flags, "--output-dir", str(tmp_path / "bad")), message
        )
