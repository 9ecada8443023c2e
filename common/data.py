"""The paint-colour task: named colours, a fixed train/held-out split, prompts, and user JSONL files.

The names come from the MIT-licensed `color-name-list` (assets/colornames.csv.gz, ~32k names) and the
CC0 xkcd colour survey (assets/xkcd.csv, 949 plain descriptive names); assets/build.py rebuilds both.
"""

import csv
import gzip
import json
import os
import re
import zlib
from functools import lru_cache

import numpy as np

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


def read_jsonl(path: str, fields: tuple[str, ...]) -> list[dict]:
    """Rows of a JSONL file, each checked to have the given string fields; a clear error otherwise."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path!r} does not exist: pass a JSONL file with fields {fields}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}:{number}: not valid JSON ({e.msg}); each line must be one object"
                ) from None
            missing = [k for k in fields if not isinstance(row, dict) or not isinstance(row.get(k), str)]
            if missing:
                raise ValueError(
                    f"{path}:{number}: row lacks string field(s) {missing}; every row needs {fields}"
                )
            rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no rows: it needs at least one JSON object with fields {fields}")
    return rows


def split_by_prompt(rows: list, prompt_of=lambda row: row["prompt"], every: int = 10) -> tuple[list, list]:
    """(training rows, held-out rows): a prompt is held out, with all its rows, when crc32(prompt) % every
    == 0, so no prompt is both trained on and evaluated, and the split never moves. When no prompt falls
    out (a small file), the prompt with the lowest hash is held out."""
    crc = {prompt_of(row): zlib.crc32(prompt_of(row).encode()) for row in rows}
    held = {p for p, c in crc.items() if c % every == 0} or {min(crc, key=lambda p: (crc[p], p))}
    return [r for r in rows if prompt_of(r) not in held], [r for r in rows if prompt_of(r) in held]


def load_prompts(path: str | None, batch_size: int, eval_size: int, eval_path: str | None = None):
    """RL prompt rows {"prompt", "answer"?, ...} for training and for the eval: the user's JSONL, with the
    eval's rows from eval_path or held out by a hash of the prompt; or the training-split hexes, with the
    fixed held-out hexes for the eval."""
    if path is None:
        rows = [{"prompt": PROMPT.format(hex=h)} for h in sorted({h for _, h in color_names("train")})]
        eval_rows = [{"prompt": p} for p in eval_prompts(eval_size)]
    elif eval_path is not None:
        rows, eval_rows = read_jsonl(path, ("prompt",)), read_jsonl(eval_path, ("prompt",))[:eval_size]
    else:
        rows, eval_rows = split_by_prompt(read_jsonl(path, ("prompt",)))
        eval_rows = eval_rows[:eval_size]
    if len(rows) < batch_size:
        raise ValueError(
            f"{len(rows)} training prompts for a batch of {batch_size}: lower --batch-size or add "
            "prompts (a tenth of a --prompts file is held out for the eval unless --eval-prompts)"
        )
    return rows, eval_rows


def judge_columns(rows: list[dict], repeat: int = 1) -> dict[str, list]:
    """Every column of the rows but the prompt, one value per completion (each row's repeated `repeat`
    times), for the judge's keyword arguments: as TRL passes dataset columns to reward functions."""
    return {key: [row.get(key) for row in rows for _ in range(repeat)] for key in rows[0] if key != "prompt"}


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
