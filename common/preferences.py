"""Preference pairs {prompt, chosen, rejected}: built by letting a judge rank names (AI feedback), or read
from JSONL, then encoded to token ids with explicit handling of identical and over-long pairs."""

import zlib

import numpy as np
import torch

from .data import PROMPT, color_names, eval_prompts, read_jsonl, split_by_prompt
from .evaluate import EVAL_NEW_TOKENS, generate
from .models import encode_completion, encode_prompt


def pair_prompts(n: int, split: str, seed: int) -> list[str]:
    """n prompts for building pairs. "train": hexes of training names, drawn with the seed; "heldout": the
    held-out hexes after the 64 the shared eval uses, in a fixed order (so the held-out pairs never move)."""
    if split == "train":
        names = color_names("train")
        return [
            PROMPT.format(hex=names[i][1])
            for i in np.random.default_rng(seed).choice(len(names), n, replace=False)
        ]
    hexes = sorted({h for _, h in color_names("heldout")}, key=lambda h: (zlib.crc32(h[1:].encode()), h))[64:]
    if n > len(hexes):
        raise ValueError(f"{n} held-out pair prompts asked for, only {len(hexes)} held-out hexes are free")
    assert not set(PROMPT.format(hex=h) for h in hexes[:n]) & set(eval_prompts(64))
    return [PROMPT.format(hex=h) for h in hexes[:n]]


def candidate_names(
    prompts: list[str],
    per_prompt: int,
    source: str,
    seed: int,
    model=None,
    tokenizer=None,
    temperature: float = 1.0,
    max_new_tokens: int = EVAL_NEW_TOKENS,
    dtype=torch.float32,
) -> list[list[str]]:
    """per_prompt names for each prompt: sampled from the model ("policy"), or random training names
    ("names")."""
    if source == "names":
        names, rng = color_names("train"), np.random.default_rng(seed)
        return [[names[i][0] for i in rng.choice(len(names), per_prompt, replace=False)] for _ in prompts]
    repeated = [p for p in prompts for _ in range(per_prompt)]
    sampled = []
    for start in range(0, len(repeated), 512):  # chunks keep memory flat; seed + start keeps it deterministic
        sampled += generate(
            model,
            tokenizer,
            repeated[start : start + 512],
            temperature,
            max_new_tokens,
            seed=seed + start,
            dtype=dtype,
        )
    return [sampled[i : i + per_prompt] for i in range(0, len(sampled), per_prompt)]


def rank_pairs(
    prompts: list[str], candidates: list[list[str]], judge, flip_prob: float = 0.0, seed: int = 0
) -> list[dict]:
    """One pair per prompt: the judge's best name is chosen, its worst rejected. Prompts whose distinct
    names all score the same (ties, or fewer than two distinct names) give no pair. With flip_prob, each
    pair is swapped with that probability: label noise, as from inattentive raters."""
    distinct = [list(dict.fromkeys(c for c in names if c.strip())) for names in candidates]
    flat_prompts = [p for p, names in zip(prompts, distinct) for _ in names]
    flat_names = [c for names in distinct for c in names]
    scores = [
        s
        for i in range(0, len(flat_names), 1024)  # chunks keep the judge's memory flat
        for s in judge(flat_prompts[i : i + 1024], flat_names[i : i + 1024])
    ]
    rng, pairs, at = np.random.default_rng(seed), [], 0
    for prompt, names in zip(prompts, distinct):
        s, at = np.asarray(scores[at : at + len(names)], dtype=float), at + len(names)
        if len(names) < 2 or s.max() == s.min():
            continue
        chosen, rejected = names[int(s.argmax())], names[int(s.argmin())]
        if flip_prob > 0 and rng.random() < flip_prob:
            chosen, rejected = rejected, chosen
        pairs.append(
            {
                "prompt": prompt,
                "chosen": chosen,
                "rejected": rejected,
                "score_chosen": float(s.max()),
                "score_rejected": float(s.min()),
            }
        )
    return pairs


def split_shared_prefix(chosen: str, rejected: str) -> tuple[str, str, str]:
    """The full-text form ("chosen": prompt + answer, "rejected": prompt + other answer) -> (prompt,
    chosen, rejected): the prompt is the longest common prefix, cut back to a whitespace so that no word is
    split."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1

    # NOTE: cut back while the cut is inside a word of either text ("... Red" vs "... Reddish" shares "Red")
    def inside_a_word(text: str) -> bool:
        return n < len(text) and not text[n].isspace()

    while n > 0 and not chosen[n - 1].isspace() and (inside_a_word(chosen) or inside_a_word(rejected)):
        n -= 1
    return chosen[:n].rstrip(), chosen[n:].strip(), rejected[n:].strip()


def read_preferences(path: str) -> list[dict]:
    """{prompt, chosen, rejected} rows, or {chosen, rejected} full texts that share their prompt as a
    prefix."""
    rows = read_jsonl(path, ("chosen", "rejected"))
    pairs = []
    for number, row in enumerate(rows, 1):
        if isinstance(row.get("prompt"), str):
            pairs.append({"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]})
            continue
        prompt, chosen, rejected = split_shared_prefix(row["chosen"], row["rejected"])
        if not prompt and row["chosen"] != row["rejected"]:
            raise ValueError(
                f"{path}: row {number} has no 'prompt' and its chosen/rejected texts share no prefix "
                "to use as one: add a 'prompt' field"
            )
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


def encode_pairs(
    tokenizer,
    pairs: list[dict],
    context: int,
    identical: str = "skip",
    too_long: str = "truncate",
    warn=print,
) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt_ids, chosen_ids, rejected_ids), completions ending in EOS (or the chat template's end-of-turn).

    identical: "skip" (counted, with a warning) or "error" for pairs whose chosen equals rejected;
    too_long: "truncate" (the completion's tail is cut to fit the context; counted, with a warning) or
    "error".
    NOTE: a truncated completion loses its EOS; both completions of the pair keep their shared prompt."""
    encoded, n_identical, n_long = [], 0, 0
    for number, pair in enumerate(pairs, 1):
        if pair["chosen"].strip() == pair["rejected"].strip():
            if identical == "error":
                raise ValueError(
                    f"pair {number} has chosen identical to rejected ({pair['chosen'][:40]!r}): "
                    "remove it, or pass --identical-pairs skip"
                )
            n_identical += 1
            continue
        prompt_ids = encode_prompt(tokenizer, pair["prompt"])
        room = context - len(prompt_ids)
        completions = [encode_completion(tokenizer, pair["prompt"], pair[k]) for k in ("chosen", "rejected")]
        if max(len(c) for c in completions) > room:
            if too_long == "error" or room < 1:
                raise ValueError(
                    f"pair {number}: prompt + completion of {len(prompt_ids) + max(map(len, completions))} "
                    f"tokens exceeds the model's context of {context}: shorten it, or pass "
                    "--too-long truncate"
                )
            n_long += 1
            completions = [c[:room] for c in completions]
        encoded.append((prompt_ids, *completions))
    if n_identical:
        warn(f"warning: skipped {n_identical} of {len(pairs)} pairs whose chosen equals rejected")
    if n_long:
        warn(f"warning: truncated {n_long} of {len(pairs)} pairs to the model's context of {context} tokens")
    if not encoded:
        raise ValueError(
            f"no preference pairs left after filtering ({len(pairs)} given, {n_identical} identical): "
            "provide pairs whose chosen and rejected differ"
        )
    return encoded


def load_pairs(
    data: str | None,
    eval_data: str | None,
    judge=None,
    sampler=None,
    num_prompts: int = 0,
    eval_pairs: int = 0,
    names_per_prompt: int = 4,
    source: str = "policy",
    flip_prob: float = 0.0,
    seed: int = 0,
    temperature: float = 1.0,
    max_new_tokens: int = EVAL_NEW_TOKENS,
    dtype=torch.float32,
    warn=print,
) -> tuple[list[dict], list[dict]]:
    """Training and held-out pairs. From JSONL: --data, and --eval-data or the pairs of about a tenth of its
    prompts (split_by_prompt). Built (AI
    feedback): for num_prompts training hexes and eval_pairs held-out ones, names_per_prompt names from
    sampler = (model, tokenizer) (source "policy") or random training names ("names"), ranked by the judge."""
    if data is not None:
        train = read_preferences(data)
        if eval_data is not None:
            return train, read_preferences(eval_data)
        if len({pair["prompt"] for pair in train}) < 2:
            raise ValueError(
                f"{data} has pairs of one prompt only: need 2 or more prompts to hold some out "
                "(by a hash of the prompt), or pass --eval-data"
            )
        return split_by_prompt(train)  # NOTE: by prompt, so that no prompt is both trained on and evaluated
    model, tokenizer = sampler or (None, None)
    built = []
    for split, n, flip in (("train", num_prompts, flip_prob), ("heldout", eval_pairs, 0.0)):
        if split == "heldout" and eval_data is not None:
            return built[0], read_preferences(eval_data)
        split_seed = seed if split == "train" else 0  # the held-out set never moves
        prompts = pair_prompts(n, split, split_seed)
        names = candidate_names(
            prompts,
            names_per_prompt,
            source,
            split_seed,
            model,
            tokenizer,
            temperature,
            max_new_tokens,
            dtype,
        )
        built.append(rank_pairs(prompts, names, judge, flip, seed))
        warn(
            f"{split}: {len(built[-1])} pairs ranked by {getattr(judge, '__name__', 'the judge')} "
            f"from {n} prompts "
            "(ties dropped)"
        )
    return built[0], built[1]
