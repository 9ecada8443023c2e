"""A task with a checkable answer, made from the colour data, for the `answer` judge (RLVR):

    python -m common.tasks basic-colours runs/basic_colours    # writes train.jsonl and eval.jsonl there
    python grpo.py --prompts runs/basic_colours/train.jsonl --eval-prompts runs/basic_colours/eval.jsonl \
        --judge answer

Each row asks for a paint colour's name as usual, and its `answer` is the nearest of the eleven basic colour
terms of Berlin and Kay (1969), by CIEDE2000 to the xkcd survey's colour for each term: the policy is paid
only for saying exactly that word.
"""

import argparse
import json
import os
from functools import lru_cache

import numpy as np

from .data import PROMPT, ciede2000, color_names, eval_prompts, hex_to_rgb, srgb_to_lab, xkcd_names

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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("task", choices=["basic-colours"])
    parser.add_argument("out", help="folder for train.jsonl (training hexes) and eval.jsonl (held-out hexes)")
    cli = parser.parse_args()
    os.makedirs(cli.out, exist_ok=True)
    train = sorted({h for _, h in color_names("train")})
    heldout = [p.split("#")[1] for p in eval_prompts(len({h for _, h in color_names("heldout")}))]
    for name, hexes in (("train", train), ("eval", ["#" + h for h in heldout])):
        with open(os.path.join(cli.out, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in basic_colour_rows(hexes))
        print(f"{cli.out}/{name}.jsonl: {len(hexes)} rows")


if __name__ == "__main__":
    main()
