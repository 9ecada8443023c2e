"""python -m common [--model PATH]: the quality report of a painter (the README's numbers)."""

import argparse
import json


from .evaluate import painter_report
from .models import load_model_and_tokenizer

parser = argparse.ArgumentParser(description="quality report of a painter model on the held-out hexes")
parser.add_argument("--model", default=None, help="model folder or hub id (default: the shipped painter)")
parser.add_argument("--seed", type=int, default=0)
cli = parser.parse_args()
model, tokenizer = load_model_and_tokenizer(cli.model)
print(json.dumps(painter_report(model, tokenizer, seed=cli.seed), indent=1, ensure_ascii=False))
