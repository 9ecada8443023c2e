"""Bring your own task: the `answer` judge, judges by import path, every column to the judge, the start-up
colour check, held-out rows split by prompt, eval/accuracy, the basic-colours RLVR task and the top-names
warm-up set."""

import json
import os

import pytest
import torch

import grpo
from common.task import get_judge, split_by_prompt
from common.colours import eval_prompts, is_heldout
from common.judges import answer
from common.recipe import trainable_names
from common.tasks import basic_colour, basic_colour_rows, described, top_names
from conftest import assert_one_line_error, read_jsonl, run_script, write_jsonl


@pytest.mark.parametrize(
    "completion, expected, score",
    [
        ("12", "12", 1.0),
        ("1.2", "12", 0.0),  # numbers as numbers: 1.2 is not 12
        ("12", "1.2", 0.0),
        ("The answer is 7, not 8", "7", 0.0),  # the final number is 8
        ("so the total is 1,234 apples.", "1234", 1.0),  # commas, units and a trailing period aside
        ("$12", "12.0", 1.0),
        ("\\boxed{42} and then 7", "42", 1.0),  # a \boxed{} final answer wins over later text
        ("steps... #### 3.5", "3.5", 1.0),  # GSM8K's '#### N'
        ("-3", "-3", 1.0),
        ("no number", "5", 0.0),
        ("Red.", "red", 1.0),  # a word: normalised exact match
        ("Dark Red", "Red", 0.0),
    ],
)
def test_the_answer_judge_by_hand(completion, expected, score):
    assert answer(["a prompt"], [completion], answer=[expected]) == [score]


def test_a_judge_by_import_path_alone_and_in_a_weighted_sum(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def length(prompts, completions, **kwargs):\n    return [float(len(c)) for c in completions]\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    prompts, names = ["Name this paint color: #aa0000"] * 2, ["Red", "Sunset Dust"]
    by_module, by_file = get_judge("my_rewards:length"), get_judge(f"{tmp_path}/my_rewards.py:length")
    assert by_module(prompts, names) == by_file(prompts, names) == [3.0, 11.0]
    mixed = get_judge("0.5*my_rewards:length+2*answer")
    assert mixed(prompts, names, answer=["Red", "Red"]) == [0.5 * 3 + 2.0, 0.5 * 11]
    with pytest.raises(ValueError, match="has no function 'nope'"):
        get_judge("my_rewards:nope")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        get_judge("missing.py:length")


def test_every_column_reaches_the_judge_and_the_split_holds_prompts_out(tmp_path, monkeypatch):
    seen = []

    def judge(prompts, completions, answer, tests, **kwargs):
        seen.extend(zip(prompts, answer, tests))
        return [0.0] * len(completions)

    monkeypatch.setattr(grpo, "get_judge", lambda spec, device, prompts=None: judge)
    rows = [{"prompt": f"Name this paint color: #{i:06x}", "answer": str(i), "tests": [i]} for i in range(40)]
    path = tmp_path / "rows.jsonl"
    write_jsonl(path, rows)
    grpo.main(
        grpo.Args(
            output_dir=str(tmp_path),
            prompts=str(path),
            total_steps=2,
            batch_size=2,
            group_size=2,
            eval_every=2,
            eval_size=8,
            log_every=1,
            max_new_tokens=4,
        )
    )
    train, held_out = split_by_prompt(rows)
    assert 0 < len(held_out) < len(rows) and not {r["prompt"] for r in train} & {
        r["prompt"] for r in held_out
    }
    by_prompt = {r["prompt"]: r for r in rows}
    assert all(by_prompt[p]["answer"] == a and by_prompt[p]["tests"] == t for p, a, t in seen)
    evaluated = {p for p, _, _ in seen} & {r["prompt"] for r in held_out}
    assert evaluated and split_by_prompt(rows) == (train, held_out)  # the split never moves


def test_a_judge_that_needs_a_colour_says_so_at_start_up(tmp_path):
    path = tmp_path / "math.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n" for i in range(20))
    )
    result = run_script("grpo.py", "--prompts", str(path), "--output-dir", str(tmp_path))  # default judge
    assert_one_line_error(result, "has no '#rrggbb' colour, which the judge 'correct'")


def test_the_basic_colours_task_and_its_accuracy_in_the_eval(tmp_path):
    assert [basic_colour(h) for h in ("#ff0000", "#0000ff", "#ffffff", "#000000", "#808080")] == [
        "Red",
        "Blue",
        "White",
        "Black",
        "Grey",
    ]
    result = run_script("-m", "common.tasks", "basic-colours", str(tmp_path / "basic"))
    assert result.returncode == 0, result.stderr
    train = read_jsonl(tmp_path / "basic" / "train.jsonl")
    held = read_jsonl(tmp_path / "basic" / "eval.jsonl")
    assert len(train) > 30_000 and not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    assert held[0] == basic_colour_rows(["#" + held[0]["prompt"].split("#")[1]])[0]
    metrics = grpo.main(
        grpo.Args(
            output_dir=str(tmp_path),
            prompts=str(tmp_path / "basic" / "train.jsonl"),
            eval_prompts=str(tmp_path / "basic" / "eval.jsonl"),
            judge="answer",
            total_steps=2,
            batch_size=2,
            group_size=4,
            eval_every=2,
            eval_size=16,
        )
    )
    assert metrics["eval/accuracy"] == metrics["eval/reward"] and 0.0 <= metrics["eval/accuracy"] <= 1.0


def test_top_names_keeps_the_judges_top_share_by_hand():
    names = [("Red", "#aa0000"), ("Ochre", "#cc7722"), ("Slate", "#708090"), ("Sunset Dust", "#d48475")]

    def shortest(prompts, completions, **kwargs):  # -3, -5, -5, -11
        assert prompts == ["Name this paint color: " + h for _, h in names]  # each name with its own colour
        return [-float(len(c)) for c in completions]

    assert top_names(shortest, names, 0.25) == names[:1]
    assert top_names(shortest, names, 0.5) == names[:3]  # the cut is -5, and both names at -5 stay
    assert top_names(shortest, names, 1.0) == names


def test_described_reads_the_words_alone():
    # "Navy Blue" is a training name of #000080: looked up, its colour is exact (ΔE 0); read from its words
    # (the mean colours of the training names with "navy" and with "blue"), it lies ΔE 29.6 away
    names = [("Navy Blue", "#000080"), ("Qwzx Plonk", "#000080")]  # the second has no known word
    assert described(names, 29.7) == names[:1]
    assert described(names, 29.5) == []


def test_the_top_names_task_writes_a_warm_up_set(tmp_path, painter):
    (tmp_path / "my_rewards.py").write_text(
        "def shortest(prompts, completions, **kwargs):\n    return [-float(len(c)) for c in completions]\n"
    )
    judge = f"{tmp_path}/my_rewards.py:shortest"
    result = run_script(
        "-m", "common.tasks", "top-names", str(tmp_path / "short"), "--judge", judge, "--top", "0.05"
    )
    assert result.returncode == 0, result.stderr
    train = read_jsonl(tmp_path / "short" / "train.jsonl")
    held = read_jsonl(tmp_path / "short" / "eval.jsonl")
    model, tokenizer = painter
    spelt = trainable_names(tokenizer, model.config.max_position_embeddings)[0]  # (name, hex) pairs
    cut = sorted(len(n) for n, _ in spelt)[round(0.05 * len(spelt)) - 1]
    shortest = [(n, h) for n, h in spelt if len(n) <= cut]  # the judge's top twentieth, ties at the cut kept
    kept = [(r["completion"], r["prompt"][-7:]) for r in train]
    assert kept == described(shortest, 15.0) and 0.3 * len(shortest) < len(kept) < len(shortest)
    assert not any(is_heldout(r["prompt"][-7:]) for r in train)
    assert [r["prompt"] for r in held[:64]] == eval_prompts(64) and all(
        is_heldout(r["prompt"][-7:]) for r in held
    )
    result = run_script(
        "-m", "common.tasks", "top-names", str(tmp_path / "x"), "--judge", judge, "--top", "10"
    )
    assert_one_line_error(result, "--top 10.0 is not a share in (0, 1]")


@pytest.mark.slow
def test_grpo_learns_the_basic_colour_terms(tmp_path):
    """RLVR in about a minute: held-out accuracy 0 -> about 0.6 in 200 steps."""
    assert run_script("-m", "common.tasks", "basic-colours", str(tmp_path)).returncode == 0
    metrics = grpo.main(
        grpo.Args(
            output_dir=str(tmp_path),
            prompts=str(tmp_path / "train.jsonl"),
            eval_prompts=str(tmp_path / "eval.jsonl"),
            judge="answer",
            total_steps=200,
            eval_every=100,
        )
    )
    assert metrics["eval/accuracy"] > 0.5


def test_preference_and_sft_files_hold_out_whole_prompts(tmp_path, painter):
    from common.task import load_pairs

    pairs = [
        {"prompt": f"Name this paint color: #{i % 25:06x}", "chosen": f"A{i}", "rejected": f"B{i}"}
        for i in range(100)
    ]  # 25 prompts, 4 pairs each
    path = tmp_path / "pairs.jsonl"
    write_jsonl(path, pairs)
    _, tokenizer = painter
    train, held_out, eval_rows = load_pairs(str(path), None, tokenizer, 64)  # (prompt_ids, chosen, rejected)
    assert len(train) + len(held_out) == 100 and held_out and len(held_out) % 4 == 0
    assert not {tuple(p) for p, _, _ in train} & {tuple(p) for p, _, _ in held_out}
    assert len(eval_rows) == len(held_out) // 4  # the eval samples names for the held-out prompts


def test_sft_evaluates_on_held_out_prompts_or_the_eval_file(tmp_path):
    import sft

    rows = [{"prompt": f"Name this paint color: #{i:06x}", "completion": "Navy"} for i in range(30)]
    data, held = tmp_path / "data.jsonl", tmp_path / "held.jsonl"
    write_jsonl(data, rows)
    held.write_text(json.dumps({"prompt": "Name this paint color: #123456", "completion": "Navy"}) + "\n")
    common = dict(
        model="common/painter",
        total_steps=1,
        batch_size=4,
        eval_every=1,
        eval_size=8,
        max_new_tokens=4,
        warmup_steps=0,
    )
    for extra, expected in [
        ({}, {r["prompt"] for r in split_by_prompt(rows)[1]}),
        ({"eval_data": str(held)}, {"Name this paint color: #123456"}),
    ]:
        run = sft.main(
            sft.Args(output_dir=str(tmp_path / str(len(extra))), data=str(data), **common, **extra)
        )
        with open(os.path.join(run["run_dir"], "samples.jsonl")) as f:
            assert {json.loads(line)["prompt"] for line in f} == expected


def test_the_rm_judge_reads_a_truncated_completion_as_unfinished(tmp_path, painter):
    from transformers import AutoModelForSequenceClassification

    from common.models import PAINTER, encode_completion, encode_prompt, save_atomic
    from common.judges import left_pad

    _, tokenizer = painter
    rm = AutoModelForSequenceClassification.from_pretrained(PAINTER, num_labels=1)
    save_atomic(rm, tokenizer, str(tmp_path / "rm"))
    judge = get_judge(f"rm:{tmp_path / 'rm'}")
    prompt, name = "Name this paint color: #d48475", "Sunset Dust Rose"
    finished, cut = judge([prompt] * 2, [name] * 2, truncated=[False, True])
    ids = encode_prompt(tokenizer, prompt) + encode_completion(tokenizer, prompt, name)[:-1]  # no end token
    input_ids, mask = left_pad([ids], tokenizer.pad_token_id)
    with torch.no_grad():
        unfinished = float(rm.score(rm.base_model(input_ids, attention_mask=mask).last_hidden_state[:, -1]))
    assert cut == pytest.approx(unfinished, abs=1e-5) and abs(cut - finished) > 1e-4
    # without the flag (TRL's call), every completion is read as finished
    assert judge([prompt], [name])[0] == pytest.approx(finished, abs=1e-5)
