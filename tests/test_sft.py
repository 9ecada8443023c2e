"""sft.py: the loss mask and loss by hand, gradient accumulation, tokenizers, smoke and CLI runs, bad
input."""

import json
import math
import os

import numpy as np
import pytest
import torch

import sft
from common.models import encode_completion, encode_prompt
from common.recipe import build_tokenizer, new_model
from conftest import assert_help_lists, assert_one_line_error, assert_run_console, read_jsonl, run_script


def tiny_args(tmp_path, **overrides) -> sft.Args:
    base = dict(
        output_dir=str(tmp_path),
        total_steps=4,
        batch_size=8,
        eval_every=2,
        eval_size=8,
        log_every=1,
        d_model=32,
        n_layers=1,
        n_heads=2,
        d_ff=64,
        max_new_tokens=6,
        warmup_steps=2,
    )
    return sft.Args(**{**base, **overrides})


def test_collate_masks_the_prompt_trains_eos_and_ignores_padding():
    eos, pad = 2, 0
    prompt_ids, prompt_mask, completion_ids, completion_mask = sft.collate(
        [([1, 7, 8], [9, eos]), ([1, 7], [eos])], pad
    )
    assert prompt_ids.tolist() == [[1, 7, 8], [pad, 1, 7]] and prompt_mask.tolist() == [[1, 1, 1], [0, 1, 1]]
    assert completion_ids.tolist() == [[9, eos], [eos, pad]]
    assert completion_mask.tolist() == [[1, 1], [1, 0]]


def test_eos_is_trained_when_pad_equals_eos():
    eos = pad = 2
    *_, completion_mask = sft.collate([([1, 7], [9, eos]), ([1], [eos])], pad)
    assert completion_mask.tolist() == [[1, 1], [1, 0]]  # both EOS tokens count


def test_completion_nll_by_hand():
    # vocab 2, the logits that predict a completion [1, 0] after its prompt
    logits = torch.tensor([[[0.0, math.log(3.0)], [math.log(4.0), 0.0]]])  # (1, 2, 2)
    completion_ids = torch.tensor([[1, 0]])
    # p(1) = 3/4, then p(0) = 4/5
    expected = -(math.log(3 / 4) + math.log(4 / 5))
    assert sft.completion_nll(logits, completion_ids, torch.ones(1, 2)).item() == pytest.approx(
        expected, abs=1e-6
    )
    # a masked token is not counted: masking the last completion token leaves log(3/4)
    assert sft.completion_nll(logits, completion_ids, torch.tensor([[1.0, 0.0]])).item() == pytest.approx(
        -math.log(3 / 4)
    )


def test_the_loss_is_the_nll_of_each_completion_token_after_everything_before_it(painter):
    """completion_logits's logits at t predict completion token t: the loss equals log-softmax over a plain
    forward of prompt + completion, read one position earlier."""
    model, tokenizer = painter
    examples = [([1, 5, 9, 13], [40, 41, 2]), ([1, 5], [42, 2])]
    prompt_ids, prompt_mask, completion_ids, completion_mask = sft.collate(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        logits = sft.completion_logits(model, prompt_ids, prompt_mask, completion_ids, completion_mask)
        expected = 0.0
        for p, c in examples:
            logp = torch.log_softmax(model(torch.tensor([p + c])).logits[0], -1)
            expected -= sum(float(logp[len(p) - 1 + t, c[t]]) for t in range(len(c)))
    loss = sft.completion_nll(logits, completion_ids, completion_mask)
    assert loss.item() == pytest.approx(expected, abs=1e-4)


def test_gradient_accumulation_equals_one_big_batch():
    torch.manual_seed(0)
    tokenizer = build_tokenizer("byte", ["abc"])
    model = new_model(tokenizer, 32, 1, 2, 64)
    rng = np.random.default_rng(0)
    batch = [
        (
            rng.integers(4, 200, size=rng.integers(2, 6)).tolist(),
            rng.integers(4, 200, size=rng.integers(1, 9)).tolist(),
        )
        for _ in range(6)
    ]  # unequal completion lengths: a per-micro-batch mean would differ
    n_tokens = sum(len(c) for _, c in batch)

    def gradient(micro: int) -> torch.Tensor:
        model.zero_grad()
        for start in range(0, len(batch), micro):
            prompt_ids, prompt_mask, completion_ids, completion_mask = sft.collate(
                batch[start : start + micro], 0
            )
            logits = sft.completion_logits(model, prompt_ids, prompt_mask, completion_ids, completion_mask)
            (sft.completion_nll(logits, completion_ids, completion_mask) / n_tokens).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    whole = gradient(6)
    assert torch.allclose(gradient(2), whole, atol=1e-6) and torch.allclose(gradient(1), whole, atol=1e-6)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    lr = [sft.lr_at(s, 100, 10, 1.0, 0.1) for s in range(100)]
    assert lr[0] == pytest.approx(0.1) and lr[9] == pytest.approx(1.0) and lr[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lr[10:], lr[11:])) and sft.lr_at(
        100, 100, 10, 1.0, 0.1
    ) == pytest.approx(0.1)


@pytest.mark.parametrize("kind", ["word", "bpe", "byte"])
def test_tokenizers_spell_the_hex_in_six_digits(kind):
    names = ["Sunset Dust", "Navy Blue", "Crème Brûlée", "Grandma's Lasagna"] * 3
    tokenizer = build_tokenizer(kind, ["Name this paint color: #d48475"] * 2 + names, vocab_size=300)
    prompt = encode_prompt(tokenizer, "Name this paint color: #d48475")
    digits = [tokenizer.convert_ids_to_tokens(i) for i in prompt[-6:]]
    assert digits == list("d48475") and prompt[0] == tokenizer.bos_token_id
    for name in names[:4]:
        ids = encode_completion(tokenizer, "Name this paint color: #d48475", name)
        assert ids[-1] == tokenizer.eos_token_id and tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True).strip() == name


def test_main_from_scratch_writes_metrics_samples_and_model(tmp_path):
    metrics = sft.main(tiny_args(tmp_path))
    run = metrics["run_dir"]
    lines = read_jsonl(os.path.join(run, "metrics.jsonl"))
    evals = [m for m in lines if "eval/reward" in m]
    assert [m["step"] for m in evals] == [0, 2, 4] and all(
        math.isfinite(m["train/loss"]) for m in lines if "train/loss" in m
    )
    assert os.path.exists(os.path.join(run, "samples.jsonl")) and os.path.exists(
        os.path.join(run, "model", "model.safetensors")
    )
    assert 0 <= metrics["eval/distinct"] <= 1


def test_main_is_reproducible(tmp_path):
    a, b = (sft.main(tiny_args(tmp_path / str(i), total_steps=3, eval_every=3)) for i in range(2))
    assert a["train/loss"] == b["train/loss"] and a["eval/reward"] == b["eval/reward"]


def test_main_fine_tunes_the_painter_on_jsonl_and_the_loss_falls(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": f"Name this paint color: #{h}", "completion": "Navy Blue"}) + "\n"
            for h in ["1f4e79", "203060", "102050", "253565"]
        )
    )
    args = tiny_args(
        tmp_path,
        model="common/painter",
        data=str(data),
        total_steps=6,
        batch_size=4,
        learning_rate=1e-3,
        grad_accum_steps=2,
        eval_every=6,
        eval_size=4,
    )
    sft.main(args)
    run = [d for d in os.listdir(tmp_path) if d.startswith("sft__")][0]
    losses = [
        json.loads(l)["train/loss"] for l in open(tmp_path / run / "metrics.jsonl") if "train/loss" in l
    ]
    assert losses[-1] < losses[0]


def test_nan_loss_stops_and_keeps_the_last_good_model(tmp_path, monkeypatch):
    monkeypatch.setattr(sft, "completion_nll", lambda *a: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(FloatingPointError, match="last good model"):
        sft.main(tiny_args(tmp_path))
    run = [d for d in os.listdir(tmp_path) if d.startswith("sft__")][0]
    assert (tmp_path / run / "model" / "model.safetensors").exists()


def test_prompt_longer_than_the_context_is_a_clear_error(tmp_path):
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"prompt": "word " * 100, "completion": "Navy"}) + "\n")
    with pytest.raises(ValueError, match="exceeds the model's context"):
        sft.main(tiny_args(tmp_path, model="common/painter", data=str(data), judge="poet"))
    with pytest.raises(ValueError, match="has no '#rrggbb' colour, which the judge 'correct'"):  # the default
        sft.main(tiny_args(tmp_path, model="common/painter", data=str(data)))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--data", "missing.jsonl"], "does not exist"),
        (["--model", "./no/such/model"], "is not a directory"),
        (["--judge", "critic"], "unknown judge 'critic'"),
    ],
)
def test_cli_bad_input_is_one_line(flags, message):
    assert_one_line_error(run_script("sft.py", *flags), message)


def test_cli_runs(tmp_path):
    result = run_script(
        "sft.py",
        "--total-steps",
        "2",
        "--batch-size",
        "4",
        "--eval-every",
        "2",
        "--eval-size",
        "4",
        "--d-model",
        "32",
        "--n-layers",
        "1",
        "--n-heads",
        "2",
        "--d-ff",
        "64",
        "--output-dir",
        str(tmp_path),
    )
    assert_run_console(result, tmp_path, "eval/reward")
    assert_help_lists(
        "sft.py", ["--grad-accum-steps", "--tokenizer", "--synthetic-frac", "--save-to", "--judge"]
    )
