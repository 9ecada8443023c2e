"""Each speed lever of the scripts measured on its own, on the painter, one thread: the time of the old way and
of the new, on a GRPO step's shapes (8 prompts x 8 completions, up to 16 new tokens) unless said.

    OMP_NUM_THREADS=1 python tests/bench/levers.py          # ~1 min; writes tests/bench/results/levers.json

- sampler: model.generate vs common.models.sample without sharing (repeats=1 on the repeated prompts) vs
  with it;
- the draw: torch.multinomial vs the inverse CDF of common.models.draw, on (64, V) probabilities;
- training forward + backward of the completions' log-probs: prompt repeated per completion vs once per group;
- a reward model's forward + backward on 64 pairs (reward_model.py's batch): each prompt once per pair vs also
  the columns every prompt shares ("<bos> Name this paint color: #") once per batch;
- the judge's embedder on 64 names: all new vs all seen before (memoised);
- one AdamW step on the painter's parameters: the for-loop kernel vs the fused one.
The variants of a lever take turns (a, b, a, b, ...); each is the median of 11 after a warm-up.
"""

import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import grpo  # noqa: E402
from common import judges  # noqa: E402
from common import models  # noqa: E402
from common.colours import color_names, eval_prompts  # noqa: E402
from common.models import draw, encode_prompt, load_model_and_tokenizer, sample, sampling_config  # noqa: E402
from reward_model import score_last_token  # noqa: E402


def timed(variants: dict, repeats: int = 11) -> dict:
    """{name: median seconds of fn() over `repeats` calls}, after one warm-up call each. The variants
    take turns (a, b, a, b, ...), so that a slow spell of this shared machine hits all of them alike."""
    times = {name: [] for name in variants}
    for fn in variants.values():
        fn()
    for _ in range(repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def nothing_shared_across_prompts(fn):
    """fn with common.models.forward_sharing_prompts sharing no columns between prompts (each prompt runs
    whole)."""

    def run():
        threshold, models.SHARE_FROM = models.SHARE_FROM, float("inf")
        try:
            fn()
        finally:
            models.SHARE_FROM = threshold

    return run


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer()
    B, G, T = 8, 8, 16
    prompts = eval_prompts(B)
    encoded = tokenizer.pad(
        {"input_ids": [encode_prompt(tokenizer, p) for p in prompts]},
        padding=True,
        return_tensors="pt",
    )
    prompt_ids, prompt_mask = encoded["input_ids"], encoded["attention_mask"]
    repeated_ids, repeated_mask = prompt_ids.repeat_interleave(G, 0), prompt_mask.repeat_interleave(G, 0)
    repeated_prompts = [p for p in prompts for _ in range(G)]  # rows i*G .. i*G+G-1: prompt i, as above
    config = sampling_config(tokenizer, model, 1.0, T)
    result = {}

    def generate():
        own, model.generation_config = model.generation_config, type(model.generation_config)()
        with torch.no_grad():
            model.generate(input_ids=repeated_ids, attention_mask=repeated_mask, generation_config=config)
        model.generation_config = own

    result["sampler_s"] = timed(
        {
            "generate": generate,
            "loop, prompt per completion": lambda: sample(model, tokenizer, repeated_prompts, config),
            "loop, prompt once per group": lambda: sample(model, tokenizer, prompts, config, repeats=G),
        }
    )

    probs = torch.softmax(torch.randn(B * G, model.config.vocab_size) * 3, -1)

    result["draw_s"] = timed(
        {
            "torch.multinomial": lambda: torch.multinomial(probs, 1),
            "inverse CDF (common.models.draw)": lambda: draw(probs),
        }
    )

    completions = sample(model, tokenizer, prompts, config, repeats=G)[2]
    mask = torch.ones_like(completions, dtype=torch.float)
    model.train()

    def train_pass(ids, id_mask):
        # grpo.py's forward: the log-probs at T = 1, log_softmax(logits).gather(completion tokens)
        grpo.forward_logprobs(model, ids, id_mask, completions, mask, 1.0)[0].sum().backward()
        model.zero_grad(set_to_none=True)

    result["forward_backward_s"] = timed(
        {
            "prompt per completion": nothing_shared_across_prompts(
                lambda: train_pass(repeated_ids, repeated_mask)
            ),
            "prompt once per group": lambda: train_pass(prompt_ids, prompt_mask),
        }
    )

    reward_model, _ = load_model_and_tokenizer(scalar_head=True)
    reward_model.train()
    pairs = tokenizer.pad({"input_ids": [encode_prompt(tokenizer, p) for p in eval_prompts(64)]},
                          padding=True, return_tensors="pt")  # fmt: skip
    names = torch.randint(10, 5000, (128, 5))  # chosen and rejected, 4 tokens and EOS each
    names_mask = torch.ones_like(names, dtype=torch.float)

    def reward_pass():
        # the scalar head on the last token's hidden state (every name token is real: the last column)
        rewards = score_last_token(
            reward_model, pairs["input_ids"], pairs["attention_mask"], names, names_mask
        )
        rewards.sum().backward()
        reward_model.zero_grad(set_to_none=True)

    result["reward_model_64_pairs_s"] = timed(
        {
            "prompt once per pair": nothing_shared_across_prompts(reward_pass),
            "and the common columns once per batch": reward_pass,
        }
    )

    names = [name for name, _ in color_names("train")]
    batches = iter([names[i : i + 64] for i in range(0, 64 * 20, 64)])
    judges.embed(names[-64:])  # loads MiniLM
    result["embed_64_names_s"] = timed(
        {
            "all new": lambda: judges.embed(next(batches)),
            "all seen (memoised)": lambda: judges.embed(names[-64:]),
        }
    )

    for p in model.parameters():
        p.grad = torch.randn_like(p)
    loop = torch.optim.AdamW(model.parameters(), lr=1e-6, foreach=False)
    fused = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
    result["adamw_step_s"] = timed({"for-loop": loop.step, "fused": fused.step})

    for lever, times in result.items():
        print(lever + ": " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in times.items()))
    out = os.path.join(ROOT, "tests", "bench", "results", "levers.json")
    with open(out, "w") as f:
        json.dump({"torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), **result}, f, indent=1)
    print("->", out)


if __name__ == "__main__":
    main()
