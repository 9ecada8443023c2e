"""common/: colour data, judges, model loading, eval."""

import copy
import json
import math

import numpy as np
import pytest
import torch

import grpo
from common.colours import ciede2000, color_names, eval_prompts, is_heldout, parse_hex, sample_colour_pairs
from common.colours import srgb_to_lab, xkcd_names
from common.judges import STYLE_EXAMPLES, correct, name_to_lab, style_judge
from common.models import PAINTER, encode_prompt, load_model_and_tokenizer, sample, sampling_config
from common.models import save_atomic
from common.models import stop_token_ids
from common.recipe import build_tokenizer, painter_texts, trainable_names
from common.task import evaluate, generate, get_judge, read_jsonl
from conftest import TINY

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


def test_sft_labels_and_colours_never_touch_a_held_out_hex():
    # the xkcd plain names that label random colours: none with a held-out hex (19 of 949 have one)
    assert len(xkcd_names("all")) > len(xkcd_names("train"))
    assert not any(is_heldout(h) for _, h in xkcd_names("train"))
    # names whose hexes sit next to held-out ones, jittered by 1: a 27-colour cube around each holds a
    # held-out hex, so about 1 row in 27 would land on one without the redraw
    near = []
    for _, h in color_names("heldout")[:40]:
        r, g, b = (int(h[i : i + 2], 16) for i in (1, 3, 5))
        neighbour = "#%02x%02x%02x" % (min(r + 1, 255), g, b)
        if not is_heldout(neighbour):
            near.append(("Near", neighbour))
    pairs = sample_colour_pairs(np.random.default_rng(0), 2000, 0.5, 1, tuple(near))
    assert not any(is_heldout(p[-7:]) for p, _ in pairs)
    assert {n for _, n in pairs} - {"Near"} <= {n for n, _ in xkcd_names("train")}


def test_no_painter_label_holds_a_word_the_tokenizer_lacks():
    tokenizer = build_tokenizer("word", painter_texts(None), min_count=2)
    names, plain = trainable_names(tokenizer, 64)
    assert len(plain) > 800 and len(names) > 20_000
    for name, _ in names + plain:
        assert tokenizer.unk_token_id not in tokenizer(name, add_special_tokens=False)["input_ids"], name


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


NAME_JUDGES = ["correct", "poet", "architect", "unhinged"]


@pytest.mark.parametrize("judge", NAME_JUDGES)
def test_a_repeated_word_costs_a_fault_on_every_name_judge(judge):
    score = get_judge(judge)
    prompts = ["Name this paint color: #96aeb0"] * 2 + ["Name this paint color: #d02b48"] * 2
    once, twice = (
        score(prompts, ["Windows Sky", "Sky", "Red", "Tomato Red"]),
        score(prompts, ["Windows Sky Sky", "Sky Sky", "Red Red", "Tomato Tomato Red"]),
    )
    # the words are read once each, then one fault (0.1) is taken off; never a gain
    assert twice == pytest.approx([s - 0.1 for s in once], abs=1e-6)


def test_correct_reads_a_doubled_name_as_the_name():
    # "Red" is a training name with its own colour; before, "Red Red" fell back to the mean of the word "red"
    # over all names, which for this hex scored 0.76 against the exact name's 0.51
    red = "Name this paint color: #d02b48"
    (single,), (double,) = correct([red], ["Red"]), correct([red], ["Red Red"])
    assert double == pytest.approx(single - 0.1) and single == pytest.approx(0.513, abs=1e-3)


@pytest.mark.parametrize("judge", NAME_JUDGES)
def test_words_past_the_fourth_never_raise_a_score(judge):
    score = get_judge(judge)
    prompt = ["Name this paint color: #d02b48"]
    four = ["Tomato Red Outer Punch", "Whispering Dawn Velvet Twilight", "Toxic Ketchup Haunted Burrito"]
    four += ["Burnt Umber Raw Sienna"]
    for name in four:
        for extra in ["Monster", "Slime Frog", "Forgotten Lullaby", "Cobalt Travertine Limestone Dust"]:
            # a word past the fourth is not read, and costs 0.1
            assert score(prompt, [f"{name} {extra}"])[0] < score(prompt, [name])[0], (name, extra)


@pytest.mark.parametrize("judge", NAME_JUDGES)
def test_case_punctuation_and_digits_do_not_count(judge):
    score = get_judge(judge)
    prompt = ["Name this paint color: #d02b48"] * 3
    plain, shouted = (
        score(prompt, ["Tomato Red", "Mulled Wine", "Sunset Dust"]),
        score(prompt, ["TOMATO RED!!!", "Mulled Wine 2000", "~ Sunset, Dust ~"]),
    )
    assert shouted == pytest.approx(plain, abs=1e-5)


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


def test_soft_overlong_punishment_is_eq_13_of_dapo_at_its_three_pieces():
    """L_max 10, L_cache 4: free up to 6 tokens, then (6 - |y|) / 4 down to -1 at 10 tokens, then -1."""
    lengths = [1, 6, 7, 8, 9, 10, 11, 30]
    ids = [[5] * n for n in lengths]
    overlong = get_judge("overlong:10:4")
    assert overlong(["p"] * 8, ["c"] * 8, completion_ids=ids) == [0, 0, -0.25, -0.5, -0.75, -1, -1, -1]
    # a term of a weighted sum, beside the answer judge; the eval and the scripts pass completion_ids
    scores = get_judge("answer+0.5*overlong:10:4")(["p"] * 3, ["Red", "Red", "Blue"], answer=["Red"] * 3,
                                                   completion_ids=[[5] * 2, [5] * 8, [5] * 12])  # fmt: skip
    assert scores == [1.0, 1.0 - 0.25, -0.5]
    assert get_judge("overlong:10:0")(["p"] * 2, ["c"] * 2, completion_ids=[[5] * 10, [5] * 11]) == [0, -1]
    with pytest.raises(ValueError, match="must pass completion_ids"):
        overlong(["p"], ["c"])
    for spec in ["overlong:10", "overlong:ten:4", "overlong:4:10"]:
        with pytest.raises(ValueError, match="L_CACHE"):
            get_judge(spec)


def test_the_eval_gives_the_judge_each_completions_token_ids(painter):
    model, tokenizer = painter
    seen = []

    def judge(prompts, completions, completion_ids, **kwargs):
        seen.extend(zip(completions, completion_ids))
        return [0.0] * len(completions)

    evaluate(model, tokenizer, judge, rows(eval_prompts(8)), max_new_tokens=4)
    stops = set(stop_token_ids(tokenizer, model))
    assert len(seen) == 8 and any(ids[-1] in stops for _, ids in seen)
    for text, ids in seen:  # through the first stop token, as TRL counts them (or all 4 when none came)
        assert tokenizer.decode(ids, skip_special_tokens=True).strip() == text
        assert (ids[-1] in stops or len(ids) == 4) and not stops & set(ids[:-1])


def test_llm_judge_gives_a_probability(tmp_path):
    from common.recipe import build_tokenizer, new_model

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


def rows(prompts: list[str]) -> list[dict]:
    return [{"prompt": p} for p in prompts]


def test_eval_reports_the_shared_metrics(painter):
    model, tokenizer = painter
    metrics, samples = evaluate(model, tokenizer, correct, rows(eval_prompts(16)), reference=model)
    assert set(metrics) == {"eval/reward", "eval/correct", "eval/distinct", "eval/top_name_share", "eval/kl"}
    assert metrics["eval/kl"] == 0.0  # to itself
    names = [s["completion"] for s in samples]
    assert metrics["eval/top_name_share"] == max(names.count(n) for n in names) / 16
    assert metrics["eval/reward"] == metrics["eval/correct"] and 0 < metrics["eval/distinct"] <= 1
    assert len(samples) == 16 and all(isinstance(s["completion"], str) for s in samples)
    again, _ = evaluate(model, tokenizer, correct, rows(eval_prompts(16)), reference=model)
    assert again == metrics  # the eval is seeded


def test_eval_kl_sums_each_completions_log_ratio_through_its_stop_token(painter):
    start, tokenizer = painter
    model = copy.deepcopy(start)  # a "trained" policy: the painter, moved a little
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    prompts = eval_prompts(12)
    metrics, _ = evaluate(model, tokenizer, correct, rows(prompts), reference=start)
    # the same samples (the eval is seeded), each row scored alone: no padding, one token at a time
    _, prompt_ids, prompt_mask, completion_ids = generate(model, tokenizer, prompts, seed=0)
    sequences = torch.cat([prompt_ids, completion_ids], 1)
    stop, P, expected = stop_token_ids(tokenizer, model), prompt_mask.shape[1], []
    for row, mask in zip(sequences, prompt_mask):
        ids, total = row[P - int(mask.sum()) :].tolist(), 0.0
        for t in range(int(mask.sum()), len(ids)):
            with torch.no_grad():
                now, then = (m(torch.tensor([ids[:t]])).logits[0, -1].log_softmax(-1) for m in (model, start))
            total += float(now[ids[t]] - then[ids[t]])
            if ids[t] in stop:
                break
        expected.append(total)
    assert metrics["eval/kl"] == pytest.approx(np.mean(expected), abs=1e-4)
    assert metrics["eval/kl"] > 0.001  # and the perturbation moved the policy


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
    evaluate(model, tokenizer, correct, rows(eval_prompts(4)), max_new_tokens=4)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize(
    "script, overrides",
    [("sft", {}), ("dpo", {}), ("dpo", {"precompute_ref_logps": True}), ("grpo", {}), ("grpo", {"beta": 0.0})]
    + [("reinforce", {}), ("ppo_rlhf", {})],
)
def test_every_policy_script_runs_one_eval_with_its_kl_to_the_start(script, overrides, tmp_path):
    import importlib

    module = importlib.import_module(script)
    assert module.Args.max_new_tokens == grpo.Args.max_new_tokens  # the same eval: eval/reward compares
    args = {**TINY[script], "total_steps": 2, "eval_every": 2, "learning_rate": 1e-3, **overrides}
    if script == "dpo":  # dpo's steps come from its pairs: one epoch of 8 pairs in batches of 4
        args = {**TINY[script], "batch_size": 4, "eval_every": 2, "learning_rate": 1e-3, **overrides}
    run_dir = module.main(module.Args(output_dir=str(tmp_path), **args))["run_dir"]
    with open(f"{run_dir}/metrics.jsonl") as f:
        evals = [m for m in map(json.loads, f) if "eval/reward" in m]
    assert evals[0]["eval/kl"] == 0.0 and evals[-1]["eval/kl"] != 0.0, evals  # the start, then a drift


# ---- the shared prompt and the sampler -----------------------------------------------------------------


def prompts_and_completions(tokenizer, hexes: list[str], r: int, T: int = 6):
    """Left-padded painter prompts, one per hex (a shorter one for None), and r random completions of each,
    right-padded by a mask."""
    prompts = [encode_prompt(tokenizer, f"Name this paint color: {h}") if h else [1, 5, 9] for h in hexes]
    encoded = tokenizer.pad({"input_ids": prompts}, padding=True, return_tensors="pt")
    g = torch.Generator().manual_seed(0)
    completion_ids = torch.randint(10, 5000, (len(hexes) * r, T), generator=g)
    completion_mask = torch.ones(len(hexes) * r, T)
    completion_mask[::3, 4:] = 0  # some completions end early
    return encoded["input_ids"], encoded["attention_mask"], completion_ids, completion_mask


def shared_forward(model, prompt_ids, prompt_mask, completion_ids, completion_mask):
    """As the scripts run it (grpo.forward_logprobs, common.models.forward_sharing_prompts): prompts once."""
    return grpo.forward_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, 1.0)[1]


def plain_forward(model, prompt_ids, prompt_mask, completion_ids, completion_mask):
    """The reference: one forward over each prompt + completion, nothing shared."""
    r = len(completion_ids) // len(prompt_ids)
    ids = torch.cat([prompt_ids.repeat_interleave(r, 0), completion_ids[:, :-1]], dim=1)
    mask = torch.cat([prompt_mask.repeat_interleave(r, 0), completion_mask[:, :-1].long()], dim=1)
    logits = model(ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
    return logits[:, prompt_ids.shape[1] - 1 :]


@pytest.mark.parametrize(
    "hexes, r, shared_columns",
    [
        (["#d48475", None], 4, 0),  # a GRPO group per prompt; prompts of two lengths share no column
        (["#d48475", "#0a0b0c", "#ffffff"], 4, 6),  # "<bos> Name this paint color: #" runs once
        (["#d48475", "#0a0b0c", "#ffffff"], 1, 6),  # one completion per prompt (SFT, PPO)
    ],
)
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 2e-4)])
def test_the_shared_prompt_gives_the_log_probs_and_gradient_of_separate_forwards(
    painter, dtype, tolerance, hexes, r, shared_columns, monkeypatch
):
    """Exact in float64 (measured: log-probs 5e-16, gradients 2e-13 of each tensor's largest entry); in fp32
    the two paths' kernels round differently (log-probs 4e-7, gradients up to 4.4e-5 of each tensor's largest
    entry with 2 threads, 1.1e-4 with one, where the common columns' gradient sums the batch's rows)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    import common.models

    def norm_in_its_dtype(self, hidden):  # HF's norm computes in fp32 whatever the model's dtype
        return (
            self.weight * hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        )

    monkeypatch.setattr(LlamaRMSNorm, "forward", norm_in_its_dtype)
    monkeypatch.setattr(common.models, "SHARE_FROM", 1)  # share the common columns of a batch of 3 too
    model, tokenizer = painter
    model = copy.deepcopy(model).to(dtype)
    prompt_ids, prompt_mask, completion_ids, completion_mask = prompts_and_completions(tokenizer, hexes, r)
    assert common.models.shared_prefix(prompt_ids, prompt_mask) == shared_columns
    weights = torch.randn(len(completion_ids), 1, generator=torch.Generator().manual_seed(1), dtype=dtype)

    def run(forward, prompt_mask=prompt_mask):  # the log-probs, and the gradient of a weighted sum
        model.zero_grad()
        logits = forward(model, prompt_ids, prompt_mask, completion_ids, completion_mask)
        logprobs = torch.log_softmax(logits, -1).gather(-1, completion_ids[..., None]).squeeze(-1)
        (weights * logprobs * completion_mask).sum().backward()
        return logprobs.detach() * completion_mask, {n: p.grad.clone() for n, p in model.named_parameters()}

    shared, shared_grads = run(shared_forward)
    separate, separate_grads = run(plain_forward)
    assert (shared - separate).abs().max() < tolerance / 10 * separate.abs().max()
    for name, grad in separate_grads.items():
        assert (shared_grads[name] - grad).abs().max() <= tolerance * grad.abs().max(), name
    # one-token completions (every completion stopped at once): the prompt's last logits, nothing more
    with torch.no_grad():
        one = shared_forward(model, prompt_ids, prompt_mask, completion_ids[:, :1], completion_mask[:, :1])
        alone = plain_forward(model, prompt_ids, prompt_mask, completion_ids[:, :1], completion_mask[:, :1])
    assert one.shape == (len(completion_ids), 1, model.config.vocab_size)
    assert torch.allclose(one, alone, atol=1e-5)
    # a completion that could not see its prompt would give other log-probs: the check can fail
    blind = torch.zeros_like(prompt_mask).index_fill_(1, torch.tensor([prompt_ids.shape[1] - 1]), 1)
    assert (run(shared_forward, blind)[0] - separate).abs().max() > 0.1


def test_the_common_columns_run_once_only_where_that_pays(painter):
    """Sharing "<bos> Name this paint color: #" costs one more call of the model: it is taken when the
    batch saves at least SHARE_FROM token positions, (b - 1) * 6 on the painter."""
    from common.models import SHARE_FROM, shared_prefix

    _, tokenizer = painter
    for b in (2, 8, SHARE_FROM // 6, SHARE_FROM // 6 + 1, SHARE_FROM // 6 + 2):
        prompt_ids, prompt_mask, *_ = prompts_and_completions(
            tokenizer, [f"#{i % 16:x}{i:05x}" for i in range(b)], 1
        )
        assert shared_prefix(prompt_ids, prompt_mask) == (6 if (b - 1) * 6 >= SHARE_FROM else 0), b


def test_the_sampler_draws_from_softmax_of_logits_over_temperature(painter):
    model, tokenizer = painter
    text = "Name this paint color: #d48475"
    prompt = tokenizer.pad({"input_ids": [encode_prompt(tokenizer, text)]}, return_tensors="pt")
    with torch.no_grad():
        logits = model(**prompt).logits[0, -1]
    n = 4000
    config = sampling_config(tokenizer, model, temperature=0.7, max_new_tokens=1)
    torch.manual_seed(0)
    first = sample(model, tokenizer, [text], config, repeats=n)[2][:, 0]  # the completions' first tokens
    frequency = torch.bincount(first, minlength=len(logits)).double() / n

    def total_variation(temperature):
        return float((frequency - torch.softmax(logits.double() / temperature, -1)).abs().sum() / 2)

    # sampling noise alone: E[TV] = 1/2 sum_k E|f_k - p_k| <= 1/2 sum_k sqrt(2 p_k (1 - p_k) / (pi n)) (the
    # normal approximation, an overestimate for the many tiny p_k), 0.15 here; torch.multinomial's own draws
    # give 0.105 and these 0.104. The wrong temperature is far off.
    p = torch.softmax(logits.double() / 0.7, -1)
    noise = float((torch.sqrt(2 * p * (1 - p) / (math.pi * n))).sum() / 2)
    assert total_variation(0.7) < noise < 2 * noise < total_variation(1.0)


def test_the_embedder_runs_once_per_new_name_and_gives_what_it_gave_alone(monkeypatch):
    from common import judges

    monkeypatch.setattr(judges, "_embeddings", judges.OrderedDict())
    monkeypatch.setattr(judges, "EMBEDDINGS_KEPT", 3)
    tokenizer, model = judges.sentence_embedder()
    seen = []
    monkeypatch.setattr(judges, "sentence_embedder", lambda: (lambda texts, **k: seen.append(texts) or
                                                              tokenizer(texts, **k), model))  # fmt: skip
    first = judges.embed(["sunset dust", "burnt sienna", "sunset dust"])
    again = judges.embed(["burnt sienna", "cinnamon toast"])
    assert seen == [["sunset dust", "burnt sienna"], ["cinnamon toast"]]  # each new name once, in one batch
    assert torch.equal(first[0], first[2]) and torch.equal(first[1], again[0])
    judges._embeddings.clear()
    alone = torch.cat([judges.embed([t]) for t in ["sunset dust", "burnt sienna", "cinnamon toast"]])
    assert torch.allclose(torch.cat([first[:2], again[1:]]), alone, atol=1e-6)  # padding changes nothing
    judges.embed(["sunset dust"])  # now the most recently used
    judges.embed(["poop"])  # a fourth name: the least recently used is forgotten
    assert list(judges._embeddings) == ["cinnamon toast", "sunset dust", "poop"]
