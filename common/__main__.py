"""python -m common [--model PATH]: the quality report of a painter (the README's numbers)."""

import argparse
import json

import numpy as np

from .colours import color_names, eval_prompts, xkcd_names
from .judges import colour_distances, correct
from .models import load_model_and_tokenizer
from .task import generate


def painter_report(model, tokenizer, n_hexes: int = 256, seed: int = 0) -> dict:
    """The shipped painter's quality bar: real words, diversity for one hex, colour fit vs random names."""
    vocabulary = {w for name, _ in color_names("all") + xkcd_names("all") for w in name.lower().split()}
    prompts = eval_prompts(n_hexes)
    names = generate(model, tokenizer, prompts, temperature=1.0, seed=seed)[0]
    one_hex = generate(model, tokenizer, prompts[:1] * 64, temperature=1.0, seed=seed)[0]
    rng = np.random.default_rng(seed)
    train = color_names("train")
    random_names = [train[i][0] for i in rng.integers(len(train), size=len(prompts))]
    ours, chance = colour_distances(prompts, names), colour_distances(prompts, random_names)
    all_names = {name.lower() for name, _ in color_names("all") + xkcd_names("all")}
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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="quality report of a painter model on the held-out hexes")
    parser.add_argument("--model", default=None, help="model folder or hub id (default: the shipped painter)")
    parser.add_argument("--seed", type=int, default=0)
    cli = parser.parse_args()
    model, tokenizer = load_model_and_tokenizer(cli.model)
    print(json.dumps(painter_report(model, tokenizer, seed=cli.seed), indent=1, ensure_ascii=False))
