"""Tasks made from the colour data, each written as JSONL for the scripts' --prompts / --data flags.

A task with a checkable answer, for the `answer` judge (RLVR):

    python -m common.tasks basic-colours runs/basic_colours    # writes train.jsonl and eval.jsonl there
    python grpo.py --prompts runs/basic_colours/train.jsonl --eval-prompts runs/basic_colours/eval.jsonl \
        --judge answer

Each row asks for a paint colour's name as usual, and its `answer` is the nearest of the eleven basic colour
terms of Berlin and Kay (1969), by CIEDE2000 to the xkcd survey's colour for each term: the policy is paid
only for saying exactly that word.

A taste's own names, for a short SFT warm-up before RL (the painters' recipe, README "Three painters"):

    python -m common.tasks top-names runs/architect --judge architect   # train.jsonl and eval.jsonl
    python sft.py --model common/painter --data runs/architect/train.jsonl \
        --eval-data runs/architect/eval.jsonl --judge architect+correct --save-to runs/architect/sft \
        --total-steps 150 --warmup-steps 10 --learning-rate 1e-3

train.jsonl holds the training names that the judge scores in its top tenth (--top), each with its own
hex: the real names of paint colours in that taste ("Raw Umber", "Tuscan Stone" for the architect). Of
those it keeps the ones whose words describe their colour: the `correct` judge, reading the words alone
(without looking the name itself up), places them within ΔE 15 of it (--within; ~60% of them). A warm-up
on names whose words say nothing of their colour ("Whispering Dawn") costs the painter its `correct`.
Names with a word the model's tokenizer lacks are left out first (they would teach it to say <unk>).
eval.jsonl holds the held-out hexes, in the eval's order, each with its name.
"""

import argparse
import json
import os
from functools import lru_cache

import numpy as np

from .colours import PROMPT, ciede2000, color_names, eval_prompts, hex_to_rgb, srgb_to_lab, xkcd_names

BASIC_TERMS = [
    "Black",
    "White",
    "Red",
    "Green",
    "Yellow",
    "Blue",
    "Brown",
    "Orange",
    "Pink",
    "Purple",
    "Grey",
]


@lru_cache(maxsize=1)
def basic_labs() -> np.ndarray:
    hexes = dict(xkcd_names("all"))  # reference colours, not labels
    return srgb_to_lab(np.array([hex_to_rgb(hexes[term]) for term in BASIC_TERMS]))


def basic_colour(hex_: str) -> str:
    """The basic colour term nearest to the hex (CIEDE2000 to each term's xkcd colour)."""
    lab = srgb_to_lab(np.array([hex_to_rgb(hex_)]))
    return BASIC_TERMS[int(ciede2000(np.repeat(lab, len(BASIC_TERMS), 0), basic_labs()).argmin())]


def basic_colour_rows(hexes: list[str]) -> list[dict]:
    return [{"prompt": PROMPT.format(hex=h), "answer": basic_colour(h)} for h in hexes]


def top_names(judge, names: list[tuple[str, str]], top: float) -> list[tuple[str, str]]:
    """The (name, hex) pairs whose names the judge scores in its top `top` share (ties at the cut kept), in
    their order. The judge sees each name with its own colour's prompt."""
    scores = np.asarray(judge([PROMPT.format(hex=h) for _, h in names], [n for n, _ in names]), dtype=float)
    cut = np.sort(scores)[::-1][max(1, round(top * len(names))) - 1]
    return [pair for pair, score in zip(names, scores) if score >= cut]


def described(names: list[tuple[str, str]], within: float) -> list[tuple[str, str]]:
    """The (name, hex) pairs whose words alone place them closer than `within` (CIEDE2000) to their own
    colour: the `correct` judge's estimate of what the name denotes, without looking the name itself up."""
    from .judges import colour_distances

    prompts = [PROMPT.format(hex=h) for _, h in names]
    distances = colour_distances(prompts, [n for n, _ in names], look_up=False)  # nan: no known word
    return [pair for pair, distance in zip(names, distances) if distance < within]


def write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    print(f"{path}: {len(rows)} rows")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("task", choices=["basic-colours", "top-names"])
    parser.add_argument("out", help="folder for train.jsonl (training hexes) and eval.jsonl (held-out hexes)")
    parser.add_argument("--judge", default="poet", help="top-names: the judge that ranks the names")
    parser.add_argument("--top", type=float, default=0.1, help="top-names: the share of the names kept")
    parser.add_argument(
        "--within", type=float, default=15.0, help="top-names: the largest ΔE of a name's words"
    )
    parser.add_argument("--model", default=None, help="top-names: the model whose tokenizer spells them")
    cli = parser.parse_args()
    if not 0 < cli.top <= 1:
        parser.error(f"--top {cli.top} is not a share in (0, 1]: keep e.g. the top tenth with --top 0.1")
    os.makedirs(cli.out, exist_ok=True)
    heldout = eval_prompts(len({h for _, h in color_names("heldout")}))
    if cli.task == "basic-colours":
        train = sorted({h for _, h in color_names("train")})
        write_jsonl(os.path.join(cli.out, "train.jsonl"), basic_colour_rows(train))
        write_jsonl(os.path.join(cli.out, "eval.jsonl"), basic_colour_rows([p[-7:] for p in heldout]))
        return
    from .task import get_judge
    from .models import load_model_and_tokenizer
    from .recipe import trainable_names

    try:
        judge = get_judge(cli.judge, "cpu")
    except (ValueError, OSError) as error:
        parser.error(str(error))
    model, tokenizer = load_model_and_tokenizer(cli.model, "cpu")
    spelt, _ = trainable_names(tokenizer, model.config.max_position_embeddings)
    kept = described(top_names(judge, list(spelt), cli.top), cli.within)
    write_jsonl(
        os.path.join(cli.out, "train.jsonl"),
        [{"prompt": PROMPT.format(hex=h), "completion": n} for n, h in kept],
    )
    name_of = {PROMPT.format(hex=h): n for n, h in color_names("heldout")}
    write_jsonl(
        os.path.join(cli.out, "eval.jsonl"), [{"prompt": p, "completion": name_of[p]} for p in heldout]
    )


if __name__ == "__main__":
    main()
