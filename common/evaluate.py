"""The eval every script shares: name the fixed held-out hexes, score the names, count distinct ones."""

import copy
import re

import numpy as np
import torch

from .data import color_names, eval_prompts, xkcd_names
from .judges import answer, colour_distances, correct
from .models import autocast, context_length, encode_prompt, sample, sampling_config, stop_token_ids


EVAL_NEW_TOKENS = 8  # every script's eval samples at most this many tokens unless --max-new-tokens says


@torch.no_grad()
def sample_names(
    model,
    tokenizer,
    prompts: list[str],
    temperature: float = 1.0,
    max_new_tokens: int = EVAL_NEW_TOKENS,
    seed: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """One completion per prompt (left padded, KV cache, plain softmax sampling at temperature, the same
    sampler as training's), under autocast in `dtype`: the names, the sequences (N, P+T) and the prompts'
    attention mask (N, P)."""
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
    completions = output[:, batch["input_ids"].shape[1] :]
    names = [t.strip() for t in tokenizer.batch_decode(completions, skip_special_tokens=True)]
    return names, output, batch["attention_mask"]


def generate(model, tokenizer, prompts: list[str], *args, **kwargs) -> list[str]:
    """The names alone of sample_names."""
    return sample_names(model, tokenizer, prompts, *args, **kwargs)[0]


@torch.no_grad()
def sequence_kl(
    model,
    reference,
    sequences: torch.Tensor,
    prompt_mask: torch.Tensor,
    stop_ids: list[int],
    temperature: float,
    dtype: torch.dtype,
    rows: int = 16,
) -> float:
    """eval/kl: KL(pi || pi_start) per completion, estimated on the eval's own samples from pi as
    mean_i sum_t log pi(y_it) - log pi_start(y_it) (k1, unbiased; Schulman 2020), at the sampling
    temperature, over the completion's tokens up to and including its stop token. The reference may live on
    another device (host memory) than the model."""
    P = prompt_mask.shape[1]
    completion = sequences[:, P:]
    is_stop = torch.isin(completion, torch.tensor(stop_ids, device=completion.device))
    first_stop = torch.where(is_stop.any(1), is_stop.float().argmax(1), completion.shape[1])
    mask = torch.arange(completion.shape[1], device=completion.device)[None] <= first_stop[:, None]
    attention_mask = torch.cat([prompt_mask, mask.long()], 1)
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)  # left padding: real tokens start at 0

    def logprobs(m) -> torch.Tensor:  # (N, T) on the CPU, rows at a time
        device, out = next(m.parameters()).device, []
        for s in torch.arange(len(sequences)).split(rows):
            ids, att, pos = (t[s].to(device) for t in (sequences, attention_mask, position_ids))
            with autocast(device, dtype):
                logits = m(ids, attention_mask=att, position_ids=pos, use_cache=False).logits[:, P - 1 : -1]
            logp = torch.log_softmax(logits.float() / temperature, dim=-1)
            out.append(logp.gather(-1, ids[:, P:, None]).squeeze(-1).cpu())
        return torch.cat(out)

    was_training = model.training
    model.eval()  # the sampler's policy: dropout off
    try:
        return float(((logprobs(model) - logprobs(reference)) * mask.cpu()).sum(1).mean())
    finally:
        model.train(was_training)


def frozen_copy(model, dtype: torch.dtype, device: str | torch.device | None = None):
    """A frozen copy of the model (the starting policy for eval/kl), in dtype, on device (default: the
    model's own)."""
    return copy.deepcopy(model).to(device=device, dtype=dtype).eval().requires_grad_(False)


def evaluate(
    model,
    tokenizer,
    judge,
    prompts: list[str] | None = None,
    temperature: float = 1.0,
    max_new_tokens: int = EVAL_NEW_TOKENS,
    dtype: torch.dtype = torch.float32,
    reference=None,
    seed: int = 0,
    **judge_kwargs,
) -> tuple[dict, list[dict]]:
    """eval/reward (the judge), eval/correct, eval/distinct (share of unique names), eval/kl (to the
    reference, the starting policy, when given) and the samples. judge_kwargs (e.g. answer=[...], one per
    prompt) go to the judge, as TRL passes dataset columns."""
    prompts = prompts or eval_prompts()
    names, sequences, prompt_mask = sample_names(
        model, tokenizer, prompts, temperature, max_new_tokens, seed, dtype
    )
    rewards = judge(prompts, names, **judge_kwargs)
    colours = all(re.search(r"#[0-9a-fA-F]{6}", p) for p in prompts)
    correctness = correct(prompts, names) if colours else [float("nan")] * len(names)
    metrics = {
        "eval/reward": float(np.mean(rewards)),
        "eval/correct": float(np.mean(correctness)),
        "eval/distinct": len(set(names)) / len(names),
    }
    if reference is not None:
        stop_ids = stop_token_ids(tokenizer, model)
        kl = sequence_kl(model, reference, sequences, prompt_mask, stop_ids, temperature, dtype)
        metrics["eval/kl"] = kl
    if "answer" in judge_kwargs:  # a verifiable task: the share of exactly right final answers
        metrics["eval/accuracy"] = float(np.mean(answer(prompts, names, answer=judge_kwargs["answer"])))
    samples = [{"prompt": p, "completion": n, "reward": r} for p, n, r in zip(prompts, names, rewards)]
    return metrics, samples


def painter_report(model, tokenizer, n_hexes: int = 256, seed: int = 0) -> dict:
    """The shipped painter's quality bar: real words, diversity for one hex, colour fit vs random names."""
    vocabulary = {w for name, _ in color_names("all") + xkcd_names("all") for w in name.lower().split()}
    prompts = eval_prompts(n_hexes)
    names = generate(model, tokenizer, prompts, temperature=1.0, seed=seed)
    one_hex = generate(model, tokenizer, prompts[:1] * 64, temperature=1.0, seed=seed)
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
