"""dpo.py: every loss type and the implicit rewards by hand, completion-only sequence log-probs, the
reference computed per batch or precomputed, the copied helper, smoke and CLI runs, bad input."""

import inspect
import json
import math
import os

import pytest
import torch

import dpo
import reward_model
from common.task import encode_pairs
from conftest import (
    assert_help_lists,
    assert_one_line_error,
    assert_run_console,
    read_jsonl,
    run_script,
    write_jsonl,
)

LOG2 = math.log(2)


def tiny_args(tmp_path, **overrides) -> dpo.Args:
    base = dict(
        output_dir=str(tmp_path),
        judge="correct",
        num_prompts=48,
        eval_pairs=16,
        batch_size=8,
        num_epochs=1,
        eval_every=3,
        eval_size=8,
        log_every=1,
        max_new_tokens=6,
        warmup_steps=1,
    )
    return dpo.Args(**{**base, **overrides})


# ---- the losses --------------------------------------------------------------------------------------------


def test_dpo_loss_is_log2_when_policy_equals_reference():
    logps = torch.tensor([-3.0, -5.0])
    loss, chosen_rewards, rejected_rewards = dpo.dpo_loss(
        chosen_logps=logps,
        rejected_logps=logps - 1,
        ref_chosen_logps=logps,
        ref_rejected_logps=logps - 1,
        beta=0.1,
    )
    assert (
        loss.item() == pytest.approx(LOG2)
        and chosen_rewards.abs().max() == 0
        and rejected_rewards.abs().max() == 0
    )
    smoothed, _, _ = dpo.dpo_loss(
        chosen_logps=logps,
        rejected_logps=logps,
        ref_chosen_logps=logps,
        ref_rejected_logps=logps,
        beta=0.1,
        label_smoothing=0.3,
    )
    assert smoothed.item() == pytest.approx(LOG2)  # cDPO too: a mixture of two log 2s


# chosen: log pi = -3 vs ref -4 (log-ratio +1, 2 tokens); rejected: -5 vs ref -4 (log-ratio -1, 4 tokens)
CHOSEN, REJECTED, REF = torch.tensor([-3.0]), torch.tensor([-5.0]), torch.tensor([-4.0])
LENGTHS = dict(chosen_lengths=torch.tensor([2.0]), rejected_lengths=torch.tensor([4.0]))


@pytest.mark.parametrize(
    "loss_type, beta, smoothing, expected",
    [
        ("sigmoid", 0.5, 0.0, math.log(1 + math.exp(-1))),  # -log sigma(0.5 * 2)
        ("sigmoid", 0.5, 0.1, 0.9 * math.log(1 + math.exp(-1)) + 0.1 * math.log(1 + math.e)),  # cDPO
        # (1/2 - (-1/4) - 1/(2*0.5))^2
        ("ipo", 0.5, 0.0, (1 / 2 + 1 / 4 - 1) ** 2),
        ("ipo", 0.1, 0.0, (0.75 - 5) ** 2),
        ("hinge", 0.5, 0.0, 0.0),  # relu(1 - 0.5 * 2)
        ("hinge", 0.25, 0.0, 0.5),  # relu(1 - 0.25 * 2)
    ],
)
def test_each_loss_type_by_hand(loss_type, beta, smoothing, expected):
    loss, chosen_rewards, rejected_rewards = dpo.dpo_loss(
        chosen_logps=CHOSEN,
        rejected_logps=REJECTED,
        ref_chosen_logps=REF,
        ref_rejected_logps=REF,
        beta=beta,
        loss_type=loss_type,
        label_smoothing=smoothing,
        **LENGTHS,
    )
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    # the implicit rewards are beta * log-ratio, whatever the loss
    assert chosen_rewards.item() == pytest.approx(beta) and rejected_rewards.item() == pytest.approx(-beta)


def test_ipo_at_the_reference_is_its_target_squared_and_hinge_is_one():
    logps, lengths = (
        torch.tensor([-3.0]),
        dict(chosen_lengths=torch.tensor([3.0]), rejected_lengths=torch.tensor([5.0])),
    )
    assert dpo.dpo_loss(
        chosen_logps=logps,
        rejected_logps=logps,
        ref_chosen_logps=logps,
        ref_rejected_logps=logps,
        beta=0.5,
        loss_type="ipo",
        **lengths,
    )[0].item() == pytest.approx(1.0)
    assert dpo.dpo_loss(
        chosen_logps=logps,
        rejected_logps=logps,
        ref_chosen_logps=logps,
        ref_rejected_logps=logps,
        beta=0.5,
        loss_type="hinge",
    )[0].item() == pytest.approx(1.0)


def test_sigmoid_gradient_pushes_chosen_up_and_rejected_down_by_beta_over_two():
    chosen, rejected = torch.tensor([-3.0], requires_grad=True), torch.tensor([-5.0], requires_grad=True)
    loss, _, _ = dpo.dpo_loss(
        chosen_logps=chosen,
        rejected_logps=rejected,
        ref_chosen_logps=chosen.detach(),
        ref_rejected_logps=rejected.detach(),
        beta=0.2,
    )
    loss.backward()
    assert chosen.grad.item() == pytest.approx(-0.1) and rejected.grad.item() == pytest.approx(0.1)


def test_unknown_loss_type_is_an_error():
    with pytest.raises(ValueError, match="unknown loss type"):
        dpo.dpo_loss(
            chosen_logps=CHOSEN,
            rejected_logps=REJECTED,
            ref_chosen_logps=REF,
            ref_rejected_logps=REF,
            beta=0.1,
            loss_type="kto",
        )


# ---- sequence log-probs ------------------------------------------------------------------------------------


def test_sequence_logprobs_sum_only_completion_tokens():
    # vocab 2; the logits that predict each completion token: completion [1, 0], then a pad
    logits = torch.tensor([[[0.0, math.log(3.0)], [math.log(4.0), 0.0], [9.0, 0.0]]])  # (1, 3, 2)
    completion_ids = torch.tensor([[1, 0, 1]])
    completion_mask = torch.tensor([[1.0, 1.0, 0.0]])
    expected = math.log(3 / 4) + math.log(4 / 5)  # p(1) = 3/4, then p(0) = 4/5; the pad excluded
    assert dpo.sequence_logprobs(logits, completion_ids, completion_mask).item() == pytest.approx(
        expected, abs=1e-6
    )


def test_padding_and_batch_neighbours_do_not_change_log_probs(painter):
    model, tokenizer = painter
    pairs = encode_pairs(
        tokenizer,
        [
            {"prompt": "Name this paint color: #d48475", "chosen": "Sunset Dust", "rejected": "Navy"},
            {
                "prompt": "Name this paint color: #1f4e79",
                "chosen": "Whispering Dawn Morning Mist",
                "rejected": "Blue",
            },
        ],
        64,
    )
    together, lengths = dpo.batch_logprobs(model, pairs, tokenizer.pad_token_id)  # (2, 2): chosen, rejected
    alone = torch.cat([dpo.batch_logprobs(model, [p], tokenizer.pad_token_id)[0] for p in pairs])
    assert torch.allclose(together, alone, atol=1e-5)
    assert lengths.tolist() == [[3, 2], [5, 2]]  # words + EOS
    # precomputed in big batches equals per-batch
    assert torch.allclose(dpo.all_logprobs(model, pairs, tokenizer.pad_token_id, 64), together, atol=1e-5)


def test_concat_pairs_is_the_same_in_dpo_and_reward_model():
    assert inspect.getsource(dpo.concat_pairs) == inspect.getsource(reward_model.concat_pairs)


# ---- runs --------------------------------------------------------------------------------------------------


def read_metrics(run: str) -> list[dict]:
    return read_jsonl(os.path.join(run, "metrics.jsonl"))


@pytest.mark.parametrize(
    "overrides", [{}, {"precompute_ref_logps": True, "loss_type": "ipo", "rpo_alpha": 0.0}]
)
def test_main_writes_metrics_samples_and_model(tmp_path, overrides):
    metrics = dpo.main(tiny_args(tmp_path, **overrides))
    run, lines = metrics["run_dir"], read_metrics(metrics["run_dir"])
    assert [m["step"] for m in lines if "eval/reward" in m] == [0, 3, 6]
    names = [
        "train/loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
        "train/grad_norm",
    ]
    train = [m for m in lines if "train/loss" in m]
    assert len(train) == 6 and all(math.isfinite(m[k]) for m in train for k in names)
    assert all(k in metrics for k in ["eval/reward", "eval/correct", "eval/distinct", "eval/accuracy"])
    assert os.path.exists(os.path.join(run, "samples.jsonl")) and os.path.exists(
        os.path.join(run, "model", "model.safetensors")
    )


def test_precomputed_reference_trains_like_the_per_batch_one(tmp_path):
    paper = dict(num_prompts=24, eval_every=100, rpo_alpha=0.0)  # the loss alone: log 2 at step 1
    a = dpo.main(tiny_args(tmp_path / "a", **paper))
    b = dpo.main(tiny_args(tmp_path / "b", **paper, precompute_ref_logps=True))
    first = [read_metrics(r["run_dir"])[1] for r in (a, b)]
    assert first[0]["train/loss"] == pytest.approx(LOG2, abs=1e-5)  # step 1: policy = reference
    assert first[0]["train/loss"] == pytest.approx(first[1]["train/loss"], abs=1e-5)
    assert a["train/loss"] == pytest.approx(b["train/loss"], abs=1e-3)


def test_main_on_jsonl_raises_the_margin(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(
        "".join(
            json.dumps(
                {
                    "chosen": f"Name this paint color: #{h} Whispering Dawn",
                    "rejected": f"Name this paint color: #{h} Dark Grey",
                }
            )
            + "\n"
            for h in ["d48475", "1f4e79", "203060", "102050"] * 5
        )
    )
    metrics = dpo.main(
        tiny_args(tmp_path, data=str(path), batch_size=6, num_epochs=4, learning_rate=2e-3, beta=0.5)
    )
    margins = [m["rewards/margins"] for m in read_metrics(metrics["run_dir"]) if "rewards/margins" in m]
    assert margins[-1] > margins[0] and metrics["eval/accuracy"] == 1.0


@pytest.mark.parametrize(
    "rows, flags, message",
    [
        ([{"prompt": "P #123456", "rejected": "A"}], [], "lacks string field(s) ['chosen']"),
        (
            [{"prompt": f"P{i} #123456", "chosen": "A", "rejected": "A"} for i in range(3)],
            ["--identical-pairs", "error"],
            "chosen identical to rejected",
        ),
        (
            [{"prompt": f"P{i} #123456", "chosen": "A", "rejected": "A"} for i in range(3)],
            [],
            "no preference pairs left",
        ),
        (
            [{"prompt": "word " * 80 + str(i), "chosen": "A", "rejected": "B"} for i in range(3)],
            [],
            "exceeds the model's context",
        ),
        (
            [{"prompt": f"P{i} #123456", "chosen": "A", "rejected": "B"} for i in range(3)],
            ["--loss-type", "ipo", "--label-smoothing", "0.1"],
            "cDPO",
        ),
    ],
)
def test_cli_bad_input_is_one_line(tmp_path, rows, flags, message):
    path = tmp_path / "bad.jsonl"
    write_jsonl(path, rows)
    assert_one_line_error(
        run_script("dpo.py", "--data", str(path), "--output-dir", str(tmp_path), *flags), message
    )


def test_cli_runs(tmp_path):
    result = run_script(
        "dpo.py",
        "--judge",
        "correct",
        "--num-prompts",
        "16",
        "--eval-pairs",
        "8",
        "--batch-size",
        "8",
        "--num-epochs",
        "1",
        "--eval-size",
        "4",
        "--eval-every",
        "2",
        "--output-dir",
        str(tmp_path),
    )
    assert_run_console(result, tmp_path, "eval/accuracy")
    assert_help_lists(
        "dpo.py", ["--loss-type", "--label-smoothing", "--rpo-alpha", "--precompute-ref-logps", "--flip-prob"]
    )
