"""The paint-colour task: named colours, a fixed train/held-out split, its prompts, SFT data and preference
pairs, and the colour science the judges use.

The names come from the MIT-licensed `color-name-list` (assets/colornames.csv.gz, ~32k names) and the
CC0 xkcd colour survey (assets/xkcd.csv, 949 plain descriptive names); assets/build.py rebuilds both.
"""

import csv
import gzip
import os
import re
import zlib
from functools import lru_cache

import numpy as np
import torch

from .task import generate

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
PROMPT = "Name this paint color: {hex}"
HEX_RE = re.compile(r"#([0-9a-fA-F]{6})\b")
HELDOUT_EVERY = 20  # a hex is held out iff crc32(hex) % 20 == 0: ~5% of names, stable across versions


def is_heldout(hex_: str) -> bool:
    return zlib.crc32(hex_.lower().encode()) % HELDOUT_EVERY == 0


@lru_cache(maxsize=None)
def color_names(split: str = "train") -> tuple[tuple[str, str], ...]:
    """(name, hex) pairs of the colour-name list; split is "train", "heldout" or "all"."""
    with gzip.open(os.path.join(ASSETS, "colornames.csv.gz"), "rt", encoding="utf-8") as f:
        rows = [(r["name"], r["hex"]) for r in csv.DictReader(f)]
    if split == "all":
        return tuple(rows)
    return tuple(r for r in rows if is_heldout(r[1]) == (split == "heldout"))


@lru_cache(maxsize=None)
def xkcd_names(split: str = "train") -> tuple[tuple[str, str], ...]:
    """(name, hex) pairs of the xkcd survey; "train" drops those with a held-out hex (they label SFT's
    colours, so one would teach the eval's answer), "all" keeps them."""
    with open(os.path.join(ASSETS, "xkcd.csv"), encoding="utf-8") as f:
        rows = tuple((r["name"], r["hex"]) for r in csv.DictReader(f))
    return rows if split == "all" else tuple(r for r in rows if not is_heldout(r[1]))


def eval_prompts(n: int = 64) -> list[str]:
    """The fixed eval set: the first n held-out hexes in a stable (crc-sorted) order."""
    hexes = sorted({h for _, h in color_names("heldout")}, key=lambda h: (zlib.crc32(h[1:].encode()), h))
    if n > len(hexes):
        raise ValueError(f"eval set of {n} asked for, only {len(hexes)} held-out hexes exist")
    return [PROMPT.format(hex=h) for h in hexes[:n]]


def parse_hex(prompt: str) -> tuple[int, int, int]:
    """The (r, g, b) of the first '#rrggbb' in a prompt."""
    match = HEX_RE.search(prompt)
    if match is None:
        raise ValueError(f"no '#rrggbb' colour in prompt {prompt[:60]!r}: the colour judges need one")
    h = match.group(1)
    return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)


def paint_prompts(eval_size: int) -> tuple[list[dict], list[dict]]:
    """The RL prompt rows of the paint task: every training-split hex, and the fixed held-out ones."""
    rows = [{"prompt": PROMPT.format(hex=h)} for h in sorted({h for _, h in color_names("train")})]
    return rows, [{"prompt": p} for p in eval_prompts(eval_size)]


def as_completion(tokenizer, name: str) -> str:
    """A name (or the judge's "Yes") as the text that completes its prompt, which ends in no space: in plain
    text after one space ("...: #d48475 Sunset Dust", the painter's and a base model's reading), as TRL's
    prompt-completion data writes it (" blue."); under a chat template the assistant's content as it is."""
    return name if getattr(tokenizer, "chat_template", None) else " " + name.strip()


def paint_examples(tokenizer, context: int, eval_size: int, synthetic_frac: float, jitter: int):
    """SFT on the paint task: a function (rng, n) -> n encoded (prompt_ids, completion_ids) of colours drawn
    fresh every call (sample_colour_pairs), with names the tokenizer can spell; and the eval's rows."""
    from .recipe import trainable_names
    from .task import encode_examples

    names, plain_names = trainable_names(tokenizer, context)  # the painter's labels, none with <unk>

    def draw(rng: np.random.Generator, n: int) -> list[tuple[list[int], list[int]]]:
        pairs = sample_colour_pairs(rng, n, synthetic_frac, jitter, names, plain_names)
        return encode_examples(tokenizer, [(p, as_completion(tokenizer, name)) for p, name in pairs], context)

    return draw, [{"prompt": p} for p in eval_prompts(eval_size)]


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
    max_new_tokens: int = 8,
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
        chunk = repeated[start : start + 512]
        sampled += generate(model, tokenizer, chunk, temperature, max_new_tokens, seed + start, dtype)[0]
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


def paint_pairs(eval_size: int, judge, sampler=None, num_prompts=0, eval_pairs=0, names_per_prompt=4,
                source="policy", flip_prob=0.0, seed=0, temperature=1.0, max_new_tokens=8, dtype=None,
                quiet=False, build_heldout=True, written_for=None
                ) -> tuple[list[dict], list[dict], list[dict]]:  # fmt: skip
    """Preference pairs of the paint task, built by AI feedback: for num_prompts training hexes and eval_pairs
    held-out ones, names_per_prompt names sampled from sampler = (model, tokenizer) (source "policy") or
    random training names ("names"), ranked by the judge (rank_pairs), written for the tokenizer that trains
    on them (written_for, as_completion; None: plain text); and the eval's rows, held-out hexes."""
    model, tokenizer = sampler or (None, None)
    built = []
    for split, n, flip in (("train", num_prompts, flip_prob), ("heldout", eval_pairs, 0.0)):
        if split == "heldout" and not build_heldout:
            built.append([])
            continue
        split_seed = seed if split == "train" else 0  # the held-out set never moves
        prompts = pair_prompts(n, split, split_seed)
        names = candidate_names(prompts, names_per_prompt, source, split_seed, model, tokenizer, temperature,
                                max_new_tokens, dtype)  # fmt: skip
        built.append(rank_pairs(prompts, names, judge, flip, seed))
        for pair in built[-1]:  # the names as the texts that complete their prompts
            pair["chosen"] = as_completion(written_for, pair["chosen"])
            pair["rejected"] = as_completion(written_for, pair["rejected"])
        if not quiet:
            name = getattr(judge, "__name__", "the judge")
            print(f"{split}: {len(built[-1])} pairs ranked by {name} from {n} "
                  "prompts (ties dropped)")  # fmt: skip
    return built[0], built[1], [{"prompt": p} for p in eval_prompts(eval_size)]


# ---- colour science: sRGB -> CIELAB, and the CIEDE2000 difference ------------------------------------------


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB in 0..255, shape (N, 3) -> CIELAB (D65), shape (N, 3)."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    xyz = c @ np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]).T
    xyz = xyz / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], axis=1)


def ciede2000(lab1: np.ndarray, lab2: np.ndarray) -> np.ndarray:
    """CIEDE2000 colour difference (Sharma, Wu & Dalal 2005, Eq. 1-22), row-wise on (N, 3) arrays."""
    L1, a1, b1 = lab1.T
    L2, a2, b2 = lab2.T
    C_bar = (np.hypot(a1, b1) + np.hypot(a2, b2)) / 2
    G = 0.5 * (1 - np.sqrt(C_bar**7 / (C_bar**7 + 25.0**7)))
    a1p, a2p = (1 + G) * a1, (1 + G) * a2
    C1p, C2p = np.hypot(a1p, b1), np.hypot(a2p, b2)
    h1p, h2p = np.degrees(np.arctan2(b1, a1p)) % 360, np.degrees(np.arctan2(b2, a2p)) % 360
    dLp, dCp = L2 - L1, C2p - C1p
    dhp = h2p - h1p
    dhp = np.where(dhp > 180, dhp - 360, np.where(dhp < -180, dhp + 360, dhp))
    dhp = np.where(C1p * C2p == 0, 0.0, dhp)
    dHp = 2 * np.sqrt(C1p * C2p) * np.sin(np.radians(dhp / 2))
    Lp_bar, Cp_bar = (L1 + L2) / 2, (C1p + C2p) / 2
    h_sum = h1p + h2p
    hp_bar = np.where(np.abs(h1p - h2p) > 180, np.where(h_sum < 360, h_sum + 360, h_sum - 360), h_sum) / 2
    hp_bar = np.where(C1p * C2p == 0, h_sum, hp_bar)
    T = (
        1
        - 0.17 * np.cos(np.radians(hp_bar - 30))
        + 0.24 * np.cos(np.radians(2 * hp_bar))
        + 0.32 * np.cos(np.radians(3 * hp_bar + 6))
        - 0.20 * np.cos(np.radians(4 * hp_bar - 63))
    )
    S_L = 1 + 0.015 * (Lp_bar - 50) ** 2 / np.sqrt(20 + (Lp_bar - 50) ** 2)
    S_C, S_H = 1 + 0.045 * Cp_bar, 1 + 0.015 * Cp_bar * T
    R_T = (
        -2
        * np.sqrt(Cp_bar**7 / (Cp_bar**7 + 25.0**7))
        * np.sin(np.radians(60 * np.exp(-(((hp_bar - 275) / 25) ** 2))))
    )
    return np.sqrt((dLp / S_L) ** 2 + (dCp / S_C) ** 2 + (dHp / S_H) ** 2 + R_T * (dCp / S_C) * (dHp / S_H))


def hex_to_rgb(hex_: str) -> tuple[int, int, int]:
    return parse_hex(hex_ if hex_.startswith("#") else "#" + hex_)


@lru_cache(maxsize=None)
def labs_of(names: tuple[tuple[str, str], ...]) -> np.ndarray:
    return srgb_to_lab(np.array([hex_to_rgb(h) for _, h in names]))


def training_rgb(rng: np.random.Generator, n: int, centres: np.ndarray | None = None, jitter: int = 0):
    """n colours (n, 3): the centres moved by up to +-jitter per channel, or uniform in 0..255 without
    centres. A colour that lands on a held-out hex is drawn again: SFT never sees an eval colour."""
    out, todo = np.zeros((n, 3), dtype=np.int64), np.arange(n)
    while len(todo):
        if centres is None:
            out[todo] = rng.integers(0, 256, (len(todo), 3))
        else:
            out[todo] = np.clip(centres[todo] + rng.integers(-jitter, jitter + 1, (len(todo), 3)), 0, 255)
        todo = todo[np.array([is_heldout("#%02x%02x%02x" % tuple(c)) for c in out[todo]], dtype=bool)]
    return out


def sample_colour_pairs(
    rng: np.random.Generator,
    n: int,
    synthetic_frac: float = 0.5,
    jitter: int = 8,
    names: tuple[tuple[str, str], ...] | None = None,
    plain_names: tuple[tuple[str, str], ...] | None = None,
) -> list[tuple[str, str]]:
    """n (prompt, name) training pairs of the built-in task.

    A share 1 - synthetic_frac are training-split names whose hex moves by up to +-jitter per channel
    (augmentation: nearby colours share a name); the rest are uniformly random colours named by their
    nearest plain name (the xkcd survey's) in CIEDE2000. Those plain names ("dusty rose") teach which words
    mean which colours, which the often fanciful real names ("Sunny Disposition") barely do. names and
    plain_names default to the training splits; no colour drawn is a held-out hex.
    """
    names, plain_names = names or color_names("train"), plain_names or xkcd_names("train")
    n_synthetic = int(rng.binomial(n, synthetic_frac))
    chosen = rng.integers(len(names), size=n - n_synthetic)
    centres = np.array([hex_to_rgb(names[i][1]) for i in chosen]).reshape(-1, 3)
    rgb = training_rgb(rng, len(chosen), centres, jitter)
    pairs = [(PROMPT.format(hex="#%02x%02x%02x" % tuple(c)), names[i][0]) for c, i in zip(rgb, chosen)]
    if n_synthetic:
        rgb = training_rgb(rng, n_synthetic)
        labs, candidates = srgb_to_lab(rgb), labs_of(plain_names)
        distances = ciede2000(np.repeat(labs, len(candidates), 0), np.tile(candidates, (n_synthetic, 1)))
        nearest = distances.reshape(n_synthetic, len(candidates)).argmin(1)
        pairs += [
            (PROMPT.format(hex="#%02x%02x%02x" % tuple(c)), plain_names[j][0]) for c, j in zip(rgb, nearest)
        ]
    order = rng.permutation(len(pairs))
    return [pairs[i] for i in order]
