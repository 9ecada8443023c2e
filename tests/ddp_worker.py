"""Runs an algorithm script's main() with two things swapped, so that one process and `torchrun
--nproc_per_node 2` can be compared to fp32 rounding (tests/test_ddp.py):
- sampling: a fixed function of the prompt, so both see the very same completions;
- AdamW: plain SGD, whose update is linear in the gradient. Adam's update g / (|g| + eps) turns fp32
  rounding of near-zero gradients (about 1e-9 here) into weight differences of up to the learning rate,
  so with Adam two correct runs differ by more than 1e-5; the gradients themselves agree to about 1e-8.

    python tests/ddp_worker.py grpo --batch-size 4 ...                 # one process, the whole batch
    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_worker.py grpo ...   # two, half each
"""

import collections
import importlib
import os
import sys
import zlib

import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.models import encode_prompt  # noqa: E402


def fixed_sample(model, tokenizer, prompts, config, repeats: int = 1, **_):
    """b text prompts -> prompt_ids, prompt_mask (b, P) and completion_ids (b * repeats, max_new_tokens): the
    k-th copy of a prompt always gets the same completion, random words of random length (sometimes
    truncated), whatever batch or rank it is in."""
    ids = [encode_prompt(tokenizer, p) for p in prompts]
    encoded = tokenizer.pad({"input_ids": ids}, return_tensors="pt")
    prompt_ids, prompt_mask = (encoded[k].to(model.device) for k in ("input_ids", "attention_mask"))
    input_ids, attention_mask = (
        prompt_ids.repeat_interleave(repeats, 0),
        prompt_mask.repeat_interleave(repeats, 0),
    )
    eos, pad, max_new_tokens = config.eos_token_id, config.pad_token_id, config.max_new_tokens
    eos = eos[0] if isinstance(eos, list) else eos
    seen, completions = collections.Counter(), []
    for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
        prompt = tuple(i for i, m in zip(ids, mask) if m)
        seen[prompt] += 1
        g = torch.Generator().manual_seed(zlib.crc32(repr((prompt, seen[prompt])).encode()))
        length = int(torch.randint(1, max_new_tokens + 1, (1,), generator=g))
        # ids 0-3 are special
        tokens = torch.randint(4, model.config.vocab_size, (max_new_tokens,), generator=g)
        if length < max_new_tokens:
            tokens[length], tokens[length + 1 :] = eos, pad
        completions.append(tokens)
    return prompt_ids, prompt_mask, torch.stack(completions).to(input_ids.device)


def sgd(params, lr: float, weight_decay: float = 0.0, **_):
    return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)


if __name__ == "__main__":
    torch.optim.AdamW = sgd
    module = importlib.import_module(sys.argv[1])
    if hasattr(module, "sample"):
        module.sample = fixed_sample
    module.main(tyro.cli(module.Args, args=sys.argv[2:]))
