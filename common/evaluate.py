"""The eval every script shares: name the fixed held-out hexes, score the names, count distinct ones."""

import re

import numpy as np
import torch

from .data import color_names, eval_prompts, xkcd_names
from .judges import answer, colour_distances, correct
from .models import autocast, context_length, encode_prompt, sample, sampling_config


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    temperature: float = 1.0,
    max_new_tokens: int = 16,
    seed: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> list[str]:
    """Sample one completion per prompt (left padded, KV cache, plain softmax sampling at temperature, the
    same sampler as training's), under autocast in `dtype`."""
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    if max(len(e) for e in encoded) + max_new_tokens > context_length(model):
        raise ValueError(
            f"prompt of {max(len(e) for e in encoded)} tokens + {max_new_tokens} new tokens exceeds "
            f"the model's context of {context_length(model)}: shorten the prompt or --max-new-tokens"
        )
    batch = tokenizer.pad({"input_ids": encoded}, padding=True, return_tensors="pt").to(model.device)
    config = sampling_config(tokenizer, model, temperature, max_new_tokens)
    # NOTE: a seeded eval must not reset the training's random stream: fork the RNG, seed, restore
    with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []):
        if seed is not None:
            torch.manual_seed(seed)
        with autocast(model.device, dtype):
            output = sample(model, batch["input_ids"], batch["attention_mask"], config)
    return [
        t.strip()
        for t in tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    ]


def evaluate(
    model,
    tokenizer,
    judge,
    prompts: list[str] | None = None,
    temperature: float = 1.0,
    max_new_tokens: int = 16,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **judge_kwargs,
) -> tuple[dict, list[dict]]:
    """eval/reward (the judge), eval/correct, eval/distinct (share of unique names) and the samples.
    judge_kwargs (e.g. answer=[...], one per prompt) go to the judge, as TRL passes dataset columns."""
    prompts = prompts or eval_prompts()
    names = generate(model, tokenizer, prompts, temperature, max_new_tokens, seed, dtype)
    rewards = judge(prompts, names, **judge_kwargs)
    colours = all(re.search(r"#[0-9a-fA-F]{6}", p) for p in prompts)
    correctness = correct(prompts, names) if colours else [float("nan")] * len(names)
    metrics = {
        "eval/reward": float(np.mean(rewards)),
        "eval/correct": float(np.mean(correctness)),
        "eval/distinct": len(set(names)) / len(names),
    }
    if "answer" in judge_kwargs:  # a verifiable task: the share of exactly right final answers
        metrics["eval/accuracy"] = float(np.mean(answer(prompts, names, answer=judge_kwargs["answer"])))
    samples = [{"prompt": p, "completion": n, "reward": r} for p, n, r in zip(prompts, names, rewards)]
    return metrics, samples


def painter_report(model, tokenizer, n_hexes: int = 256, seed: int = 0) -> dict:
    """The shipped painter's quality bar: real words, diversity for one hex, colour fit vs random names."""
    vocabulary = {w for name, _ in color_names("all") + xkcd_names() for w in name.lower().split()}
    prompts = eval_prompts(n_hexes)
    names = generate(model, tokenizer, prompts, temperature=1.0, seed=seed)
    one_hex = generate(model, tokenizer, prompts[:1] * 64, temperature=1.0, seed=seed)
    rng = np.random.default_rng(seed)
    train = color_names("train")
    random_names = [train[i][0] for i in rng.integers(len(train), size=len(prompts))]
    ours, chance = colour_distances(prompts, names), colour_distances(prompts, random_names)
    all_names = {name.lower() for name, _ in color_names("all") + xkcd_names()}
    return {
        "known_words": float(
            np.mean([bool(n.split()) and all(w.lower() in vocabulary for w in n.split()) for n in names])
        ),
        "existing_names": float(np.mean([n.lower() in all_names for n in names])),
        "distinct_one_hex": len(set(one_hex)) / len(one_hex),
        "distinct": len(set(names)) / len(names),
        "median_delta_e": float(np.nanmedian(ours)),
        "median_delta_e_random_names": float(np.nanmedian(chance)),
        "correct": float(np.mean(correct(prompts, names))),
        "correct_random_names": float(np.mean(correct(prompts, random_names))),
        "placed_by_judge": float(np.mean(~np.isnan(ours))),
        "samples": [f"{p[-7:]} -> {n}" for p, n in zip(prompts[:12], names[:12])],
        "samples_one_hex": f"{prompts[0][-7:]} -> " + " | ".join(one_hex[:12]),
    }
