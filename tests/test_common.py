"""common/: colour data, judges, model loading, eval."""

import json
import math

import numpy as np
import pytest
import torch

from common import PAINTER, evaluate, get_judge, load_model_and_tokenizer, read_jsonl, save_atomic
from common.data import (
    ciede2000,
    color_names,
    eval_prompts,
    is_heldout,
    parse_hex,
    sample_colour_pairs,
    srgb_to_lab,
)
from common.judges import STYLE_EXAMPLES, correct, name_to_lab, style_judge

HEX = "Name this paint color: #1f4e79"


# ---- colour data -------------------------------------------------------------------------------------------


def test_colour_data_split_is_fixed_and_disjoint():
    train, heldout = color_names("train"), color_names("heldout")
    assert len(train) + len(heldout) == len(color_names("all")) > 30_000
    assert 1000 < len(heldout) < 2500
    assert not {h for _, h in train} & {h for _, h in heldout}
    prompts = eval_prompts(64)
    assert len(set(prompts)) == 64 and prompts == eval_prompts(64)
    assert all(is_heldout("#" + p.split("#")[1]) for p in prompts)


def test_ciede2000_matches_sharma_wu_dalal_reference_pairs():
    # pairs 1, 7 and 17 of the published CIEDE2000 test data (Sharma, Wu & Dalal 2005, Table 1)
    lab1 = np.array([[50.0, 2.6772, -79.7751], [50.0, 0.0, 0.0], [50.0, 2.5, 0.0]])
    lab2 = np.array([[50.0, 0.0, -82.7485], [50.0, -1.0, 2.0], [73.0, 25.0, -18.0]])
    assert np.allclose(ciede2000(lab1, lab2), [2.0425, 2.3669, 27.1492], atol=1e-4)


def test_srgb_to_lab_white_black_and_red():
    lab = srgb_to_lab(np.array([[255, 255, 255], [0, 0, 0], [255, 0, 0]]))
    assert np.allclose(lab[0], [100, 0, 0], atol=0.05) and np.allclose(lab[1], [0, 0, 0], atol=1e-6)
    assert np.allclose(lab[2], [53.24, 80.09, 67.20], atol=0.1)


def test_built_in_pairs_are_deterministic_and_near_their_colour():
    a, b = (sample_colour_pairs(np.random.default_rng(3), 200) for _ in range(2))
    assert a == b and len(a) == 200
    distances = [d for d in correct([p for p, _ in a], [n for _, n in a])]
    assert np.mean(distances) > 0.5  # names describe their (jittered or nearest-xkcd) colours


def test_parse_hex_and_its_error():
    assert parse_hex(HEX) == (0x1F, 0x4E, 0x79)
    with pytest.raises(ValueError, match="no '#rrggbb'"):
        parse_hex("Name this paint color: blue")


# ---- judges ------------------------------------------------------------------------------------------------


def test_correct_judge_orders_names_by_colour():
    navy, lemon = correct([HEX, HEX], ["Navy Blue", "Lemon Yellow"])
    assert navy > lemon
    scores = correct(["#d48475"] * 4, ["Terracotta", "Dusty Rose", "Ocean Blue", "Forest Green"])
    assert min(scores[:2]) > max(scores[2:])
    assert correct([HEX], ["Qwxzv Plorf"]) == [0.0]  # no known word: no credit
    assert all(0.0 <= s <= 1.0 for s in scores)


def test_correct_judge_beats_chance_on_held_out_names():
    heldout = color_names("heldout")[:400]
    rng = np.random.default_rng(0)
    shuffled = [heldout[i][1] for i in rng.permutation(len(heldout))]
    own = correct([h for _, h in heldout], [n for n, _ in heldout])
    other = correct(shuffled, [n for n, _ in heldout])
    assert np.mean(np.array(own) > np.array(other)) > 0.7


def test_correct_judge_needs_a_hex_in_the_prompt():
    with pytest.raises(ValueError, match="no '#rrggbb' colour in prompt"):
        correct(["Name this paint color, please"], ["Navy Blue"])


def test_correct_judge_takes_trl_chat_completions():
    chat = [[{"role": "assistant", "content": "Navy Blue"}]]
    assert correct([HEX], chat) == correct([HEX], ["Navy Blue"])
    assert name_to_lab("Navy Blue") is not None


@pytest.mark.parametrize("style", sorted(STYLE_EXAMPLES))
def test_each_style_judge_prefers_its_own_examples(style):
    judge = style_judge(style)
    own = judge([HEX] * 8, STYLE_EXAMPLES[style][0][:8])
    others = [n for s in STYLE_EXAMPLES if s != style for n in STYLE_EXAMPLES[s][0][:8]]
    assert np.mean(own) > np.mean(judge([HEX] * len(others), others)) + 0.1


def test_style_judges_rank_unseen_names():
    names = [
        "Whispering Rain",
        "Autumn Wandering",
        "Granite",
        "Raw Umber",
        "Alarming Slime",
        "Zombie Toenail",
    ]
    scores = {s: style_judge(s)([HEX] * 6, names) for s in STYLE_EXAMPLES}
    for style, own in {"poet": {0, 1}, "architect": {2, 3}, "unhinged": {4, 5}}.items():
        assert set(np.argsort(scores[style])[-2:].tolist()) == own, (style, scores[style])
    assert style_judge("poet")([HEX], [""]) == [-1.0]


def test_weighted_sum_of_judges():
    names = ["Navy Blue", "Whispering Dawn", "Lemon Yellow"]
    poet, right = style_judge("poet")([HEX] * 3, names), correct([HEX] * 3, names)
    assert np.allclose(
        get_judge("0.7*poet+0.3*correct")([HEX] * 3, names), 0.7 * np.array(poet) + 0.3 * np.array(right)
    )
    assert np.allclose(get_judge("poet+correct")([HEX] * 3, names), np.array(poet) + np.array(right))
    assert get_judge("correct")([HEX] * 3, names) == correct([HEX] * 3, names)
    assert get_judge("correct").__name__ == "correct" and get_judge("poet+correct").__name__ == "poet+correct"


def test_unknown_judge_lists_the_known_ones():
    with pytest.raises(ValueError, match="known judges: correct, poet, architect, unhinged"):
        get_judge("poet+critic")


def test_llm_judge_gives_a_probability(tmp_path):
    from sft import build_tokenizer, new_model

    tokenizer = build_tokenizer("bpe", ["Answer Yes or No. Yes", "Answer Yes or No. No"] * 10, vocab_size=300)
    torch.manual_seed(0)
    save_atomic(new_model(tokenizer, 32, 1, 2, 64, context=256), tokenizer, str(tmp_path / "llm"))
    scores = get_judge(f"llm:{tmp_path / 'llm'}")([HEX, HEX], ["Navy Blue", "Lemon"])
    assert len(scores) == 2 and all(0.0 < s < 1.0 for s in scores)


def test_reward_model_judge_reads_the_last_real_token(tmp_path, painter):
    from transformers import AutoModelForSequenceClassification

    _, tokenizer = painter
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(PAINTER, num_labels=1)
    save_atomic(rm, tokenizer, str(tmp_path / "rm"))
    judge = get_judge(f"rm:{tmp_path / 'rm'}")
    short, long_ = judge([HEX, HEX], ["Navy", "Navy Blue Deep Sea"])
    alone = judge([HEX], ["Navy"])[0]  # the same sequence without left padding gives the same score
    assert math.isfinite(short) and abs(short - alone) < 1e-5 and short != long_
    with pytest.raises(ValueError, match="not a reward model"):
        get_judge(f"rm:{PAINTER}")


# ---- models, data files, eval ------------------------------------------------------------------------------


def test_painter_loads_with_left_padding_and_a_distinct_pad(painter):
    model, tokenizer = painter
    assert tokenizer.padding_side == "left" and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.dtype == torch.float32 and model.config.attention_dropout == 0.0
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        load_model_and_tokenizer(str(tmp_path / "nope"))


@pytest.mark.parametrize(
    "content, message",
    [('{"prompt": "a"}\n', "lacks string field"), ("not json\n", "not valid JSON"), ("\n", "holds no rows")],
)
def test_bad_jsonl_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / "data.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_jsonl(str(path), ("prompt", "completion"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_jsonl(str(tmp_path / "missing.jsonl"), ("prompt",))


def test_eval_reports_the_shared_metrics(painter):
    model, tokenizer = painter
    metrics, samples = evaluate(model, tokenizer, correct, eval_prompts(16), max_new_tokens=8)
    assert set(metrics) == {"eval/reward", "eval/correct", "eval/distinct"}
    assert metrics["eval/reward"] == metrics["eval/correct"] and 0 < metrics["eval/distinct"] <= 1
    assert len(samples) == 16 and all(isinstance(s["completion"], str) for s in samples)
    again, _ = evaluate(model, tokenizer, correct, eval_prompts(16), max_new_tokens=8)
    assert again == metrics  # the eval is seeded


def test_save_is_atomic_and_replaces(tmp_path, painter):
    model, tokenizer = painter
    target = tmp_path / "model"
    for _ in range(2):
        save_atomic(model, tokenizer, str(target))
    assert (target / "model.safetensors").exists() and not (tmp_path / "model.tmp").exists()
    assert json.loads((target / "config.json").read_text())["vocab_size"] == model.config.vocab_size


def test_a_seeded_eval_leaves_the_training_random_stream_alone(painter):
    model, tokenizer = painter
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    evaluate(model, tokenizer, correct, eval_prompts(4), max_new_tokens=4)
    assert torch.equal(torch.rand(3), expected)
