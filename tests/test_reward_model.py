"""reward_model.py and its pairs (common/task.py, colours.py): the Bradley–Terry loss by hand, the last real
token under every padding, the rm: judge agreeing with training, the pair builder, smoke and CLI runs, bad
input."""

import json
import math
import os

import pytest
import torch

import reward_model as rm
from common.colours import candidate_names, eval_prompts, pair_prompts, rank_pairs
from common.models import encode_completion, encode_prompt, load_model_and_tokenizer
from common.task import encode_pairs, get_judge, read_pairs, split_shared_prefix
from conftest import (
    assert_help_lists,
    assert_one_line_error,
    assert_run_console,
    read_jsonl,
    run_script,
    write_jsonl,
)

PROMPTS = [
    "Name this paint color: #d48475",
    "Name this paint color: #1f4e79",
    "Name this paint color: #ffffff",
]
NAMES = ["Sunset Dust", "Navy", "Whispering Dawn Morning Mist"]


def tiny_args(tmp_path, **overrides) -> rm.Args:
    base = dict(
        output_dir=str(tmp_path),
        judge="correct",
        num_prompts=48,
        eval_prompts=16,
        batch_size=8,
        num_epochs=1,
        eval_every=3,
        log_every=1,
    )
    return rm.Args(**{**base, **overrides})


@pytest.fixture(scope="module")
def reward_net():
    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer(scalar_head=True)
    torch.nn.init.normal_(model.score.weight, std=1.0)  # a head that reads the hidden state visibly
    return model, tokenizer


# ---- the loss ----------------------------------------------------------------------------------------------


def test_bradley_terry_loss_and_accuracy_by_hand():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])
    loss, accuracy = rm.bradley_terry_loss(chosen_rewards=chosen, rejected_rewards=rejected)
    assert loss.item() == pytest.approx((math.log(1 + math.exp(-2)) + math.log(1 + math.exp(1))) / 2)
    assert accuracy.item() == 0.5
    # a margin of 1 asks for r_c - r_r > 1: -log sigma(1) and -log sigma(-2)
    loss, _ = rm.bradley_terry_loss(chosen_rewards=chosen, rejected_rewards=rejected, margin=1.0)
    assert loss.item() == pytest.approx((math.log(1 + math.exp(-1)) + math.log(1 + math.exp(2))) / 2)
    # centering adds c * mean((r_c + r_r)^2) = 0.1 * (4 + 1) / 2
    centred, _ = rm.bradley_terry_loss(chosen_rewards=chosen, rejected_rewards=rejected, center_coef=0.1)
    assert centred.item() == pytest.approx(
        rm.bradley_terry_loss(chosen_rewards=chosen, rejected_rewards=rejected)[0].item() + 0.25
    )


def test_equal_rewards_give_log2_and_count_as_wrong():
    loss, accuracy = rm.bradley_terry_loss(chosen_rewards=torch.zeros(3), rejected_rewards=torch.zeros(3))
    assert loss.item() == pytest.approx(math.log(2)) and accuracy.item() == 0.0


def test_the_loss_only_sees_differences_without_centering():
    chosen, rejected = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.0])
    assert rm.bradley_terry_loss(chosen_rewards=chosen + 7, rejected_rewards=rejected + 7)[
        0
    ].item() == pytest.approx(
        rm.bradley_terry_loss(chosen_rewards=chosen, rejected_rewards=rejected)[0].item()
    )
    assert (
        rm.bradley_terry_loss(chosen_rewards=chosen + 7, rejected_rewards=rejected + 7, center_coef=0.01)[0]
        > rm.bradley_terry_loss(chosen_rewards=chosen, rejected_rewards=rejected, center_coef=0.01)[0]
    )


# ---- the last real token -----------------------------------------------------------------------------------


def encoded(tokenizer, prompts=(*PROMPTS[:2], "Name a color:")) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids) of the three names; by default the last after a shorter prompt (so
    prompts pad)."""
    return [(encode_prompt(tokenizer, p), encode_completion(tokenizer, p, n)) for p, n in zip(prompts, NAMES)]


def score_alone(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    ones = torch.ones(1, len(prompt), dtype=torch.long), torch.ones(1, len(completion))
    return rm.score_last_token(model, torch.tensor([prompt]), ones[0], torch.tensor([completion]), ones[1])[0]


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_reward_is_read_at_the_last_real_token(reward_net, pad_is_eos):
    model, tokenizer = reward_net
    rows = encoded(tokenizer)
    # pairs as training builds them: each prompt once (left padded), then two completions (right padded)
    batch = [(p, c, rows[(i + 1) % 3][1]) for i, (p, c) in enumerate(rows)]
    assert len({len(p) for p, _ in rows}) == 2 and len({len(c) for _, c in rows}) == 3  # padding happens
    pad_id = tokenizer.eos_token_id if pad_is_eos else tokenizer.pad_token_id
    scores = rm.score_last_token(model, *rm.concat_pairs(batch, pad_id)).view(-1, 2)
    for column in (0, 1):  # chosen, rejected
        alone = torch.stack([score_alone(model, pair[0], pair[1 + column]) for pair in batch])
        assert torch.allclose(scores[:, column], alone, atol=1e-5)


def test_reading_a_padding_position_would_give_another_reward(reward_net):
    model, tokenizer = reward_net  # guards the test above: the position read matters
    tensors = rm.concat_pairs([(p, c, c) for p, c in encoded(tokenizer)], tokenizer.pad_token_id)
    prompt_ids, prompt_mask, completion_ids, completion_mask = tensors
    input_ids = torch.cat([prompt_ids.repeat_interleave(2, 0), completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask.repeat_interleave(2, 0), completion_mask.long()], dim=1)
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    output_hidden_states=True)  # fmt: skip
    wrong = model.score(out.hidden_states[-1][:, -1]).squeeze(-1)
    assert not torch.allclose(wrong, rm.score_last_token(model, *tensors), atol=1e-3)


def test_concat_pairs_puts_each_prompt_once_then_chosen_and_rejected_and_trains_eos_equal_to_pad():
    eos = pad = 2
    prompt_ids, prompt_mask, completion_ids, completion_mask = rm.concat_pairs(
        [([1, 7], [9, eos], [eos]), ([1], [eos], [5, 6, eos])], pad
    )
    assert prompt_ids.tolist() == [[1, 7], [pad, 1]] and prompt_mask.tolist() == [[1, 1], [0, 1]]
    assert completion_ids.tolist() == [[9, eos, pad], [eos, pad, pad], [eos, pad, pad], [5, 6, eos]]
    assert completion_mask.tolist() == [[1, 1, 0], [1, 0, 0], [1, 0, 0], [1, 1, 1]]


# ---- preference pairs --------------------------------------------------------------------------------------


def test_pair_builder_is_deterministic_without_ties_and_chosen_scores_higher(painter):
    model, tokenizer = painter
    judge = get_judge("correct")
    prompts = pair_prompts(24, "train", seed=3)
    assert prompts == pair_prompts(24, "train", seed=3) and prompts != pair_prompts(24, "train", seed=4)
    names = candidate_names(prompts, 4, "policy", 3, model, tokenizer)
    assert names == candidate_names(prompts, 4, "policy", 3, model, tokenizer)
    pairs = rank_pairs(prompts, names, judge, seed=3)
    assert pairs == rank_pairs(prompts, names, judge, seed=3) and len(pairs) > 12
    chosen = judge([p["prompt"] for p in pairs], [p["chosen"] for p in pairs])
    rejected = judge([p["prompt"] for p in pairs], [p["rejected"] for p in pairs])
    assert all(c > r for c, r in zip(chosen, rejected))


def test_ties_and_single_names_give_no_pair_and_flips_swap():
    by_length = lambda prompts, completions: [float(len(c) > 4) for c in completions]  # noqa: E731
    names = [["Red", "Blue", "Teal"], ["Navy", "Navy", "Crimson"], ["Gold", "Gold"], ["Sky", "Crimson"]]
    pairs = rank_pairs(PROMPTS[:1] * 4, names, by_length)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("Crimson", "Navy"), ("Crimson", "Sky")]
    flipped = rank_pairs(PROMPTS[:1] * 4, names, by_length, flip_prob=1.0)
    assert [(p["chosen"], p["rejected"]) for p in flipped] == [("Navy", "Crimson"), ("Sky", "Crimson")]


def test_heldout_pair_prompts_are_fixed_and_disjoint_from_training_and_eval():
    heldout = pair_prompts(100, "heldout", seed=0)
    assert heldout == pair_prompts(100, "heldout", seed=9)
    assert not set(heldout) & set(eval_prompts(64)) and not set(heldout) & set(
        pair_prompts(2000, "train", seed=1)
    )


def test_full_text_pairs_split_at_their_shared_prefix(tmp_path):
    # the space goes with the answers: prompt + answer is the text given
    assert split_shared_prefix(
        "Name this paint color: #d48475 Sunset Dust", "Name this paint color: #d48475 Navy"
    ) == ("Name this paint color: #d48475", " Sunset Dust", " Navy")
    # one answer a prefix of the other: the cut stays at the word boundary, whichever is chosen
    short, long = "Name this paint color: #d48475 Red", "Name this paint color: #d48475 Reddish"
    assert split_shared_prefix(short, long) == ("Name this paint color: #d48475", " Red", " Reddish")
    assert split_shared_prefix(long, short) == ("Name this paint color: #d48475", " Reddish", " Red")
    path = tmp_path / "pairs.jsonl"
    path.write_text(
        json.dumps({"prompt": "P #123456", "chosen": "A", "rejected": "B"})
        + "\n"
        + json.dumps({"chosen": "Q #123456 Sunset Dust", "rejected": "Q #123456 Sunset Glow"})
        + "\n"
    )
    assert read_pairs(str(path)) == [
        {"prompt": "P #123456", "chosen": "A", "rejected": "B"},
        {"prompt": "Q #123456 Sunset", "chosen": " Dust", "rejected": " Glow"},
    ]


def test_encode_pairs_skips_or_rejects_identical_and_truncates_long(painter):
    _, tokenizer = painter
    pairs = [
        {"prompt": PROMPTS[0], "chosen": "Navy", "rejected": "Navy"},
        {"prompt": PROMPTS[0], "chosen": "Navy Blue Sky", "rejected": "Red"},
    ]
    warnings = []
    encoded = encode_pairs(tokenizer, pairs, 64, warn=warnings.append)
    assert len(encoded) == 1 and "skipped 1 of 2" in warnings[0]
    with pytest.raises(ValueError, match="chosen identical to rejected"):
        encode_pairs(tokenizer, pairs, 64, identical="error")
    prompt_len = len(encode_prompt(tokenizer, PROMPTS[0]))
    ((p, c, r),) = encode_pairs(tokenizer, pairs[1:], prompt_len + 2, warn=warnings.append)
    assert len(c) == 2 and len(r) == 2 and "truncated 1 of 1" in warnings[-1]
    with pytest.raises(ValueError, match="exceeds the model's context"):
        encode_pairs(tokenizer, pairs[1:], prompt_len + 2, too_long="error")
    with pytest.raises(ValueError, match="no preference pairs left"):
        encode_pairs(tokenizer, pairs[:1], 64, warn=warnings.append)


# ---- runs --------------------------------------------------------------------------------------------------


def test_main_writes_metrics_and_a_model_the_rm_judge_scores_identically(tmp_path):
    metrics = rm.main(tiny_args(tmp_path))
    run = metrics["run_dir"]
    lines = read_jsonl(os.path.join(run, "metrics.jsonl"))
    train = [m for m in lines if "train/loss" in m]
    assert [m["step"] for m in lines if "eval/accuracy" in m] == [0, 3, 6]
    assert all(math.isfinite(m[k]) for m in train for k in ("train/loss", "train/accuracy", "train/margin"))
    assert 0 <= metrics["eval/accuracy"] <= 1
    # the rm: judge loads the saved model and scores each name as score_last_token does (and the pairs'
    # shared-prompt scores equal these: test_reward_is_read_at_the_last_real_token)
    judge = get_judge(f"rm:{run}/model")
    model, tokenizer = load_model_and_tokenizer(f"{run}/model", scalar_head=True)
    assert model.config.num_labels == 1
    ours = torch.stack([score_alone(model, p, c) for p, c in encoded(tokenizer, PROMPTS)])
    assert judge(PROMPTS, NAMES) == pytest.approx(ours.tolist(), abs=1e-5)


def test_main_reads_jsonl_pairs_and_learns_them(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(
        "".join(
            json.dumps(
                {
                    "prompt": f"Name this paint color: #{h}",
                    "chosen": "Whispering Dawn",
                    "rejected": "Dark Grey",
                }
            )
            + "\n"
            for h in ["d48475", "1f4e79", "203060", "102050"] * 5
        )
    )
    metrics = rm.main(tiny_args(tmp_path, data=str(path), batch_size=6, num_epochs=4, learning_rate=3e-3))
    assert metrics["eval/accuracy"] == 1.0 and metrics["eval/loss"] < math.log(2)


@pytest.mark.parametrize(
    "rows, flags, message",
    [
        ([{"prompt": "P #123456", "chosen": "A"}], [], "lacks string field(s) ['rejected']"),
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
    ],
)
def test_cli_bad_input_is_one_line(tmp_path, rows, flags, message):
    path = tmp_path / "bad.jsonl"
    write_jsonl(path, rows)
    assert_one_line_error(
        run_script("reward_model.py", "--data", str(path), "--output-dir", str(tmp_path), *flags), message
    )


def test_cli_runs(tmp_path):
    result = run_script(
        "reward_model.py",
        "--judge",
        "correct",
        "--num-prompts",
        "24",
        "--eval-prompts",
        "8",
        "--batch-size",
        "8",
        "--num-epochs",
        "1",
        "--output-dir",
        str(tmp_path),
    )
    assert_run_console(result, tmp_path, "eval/accuracy")
    assert_help_lists(
        "reward_model.py", ["--center-coef", "--margin", "--flip-prob", "--identical-pairs", "--too-long"]
    )
