"""The real-model check, one command: a random-init model of Qwen2.5-0.5B's shape made to behave as a trained one
where the scripts can break, nothing downloaded. Every check prints PASS or FAIL; the script exits 1 if one fails.

    python tests/bench/gpu_check.py            # a CUDA machine: the 0.5B shape, bf16; ~6 min on one H100 (estimated)
    python tests/bench/gpu_check.py --small    # anywhere (CPU here): the same checks on a small config, ~40 s

On a GPU it writes ~60 GB into its temporary folder (fp32 models, and checkpoints of 12 bytes per parameter in the
resume check), at most ~25 GB at a time, and prints each step as it goes.

The model, written into a temporary folder: Qwen2.5-0.5B-Instruct's shape (a Llama: hidden 896, 24 layers, 14
heads, 2 KV heads, MLP 4864, 151,936 tokens, tied embeddings; Qwen2 differs by biases on q, k, v), a ChatML
tokenizer whose end-of-turn <|im_end|> is not its EOS, and a generation_config with Qwen2.5-Instruct's quirks
(repetition_penalty 1.1, top_k 20, top_p 0.8, temperature 0.7, EOS ids [<|im_end|>, <|endoftext|>]), saved in bf16
as the hub checkpoint is. A random init is near-uniform over 151,936 tokens (11.9 nats): it never samples a stop
token, so no completion stops early and no mask is exercised, and its logits are too small for bf16 rounding to
show. So, before saving, with the hidden states of its own prompts and samples:
  - sharp logits: the final norm's weight is scaled until the next-token entropy is ~2 nats;
  - early stops: the last layer's o_proj gets a bias (the config's attention_bias, so q, k, v get zero ones too)
    that puts a constant on one coordinate of the residual, which the final norm weighs and only the rows of
    <|im_end|> and <|endoftext|> read: one stop in ~8 tokens, a third of them on <|endoftext|> (the second EOS).
Prompts have different lengths (a hex and 0-27 words; --small: 0-13), so everything runs on left-padded batches.

Checks (--small asserts the same, on its config):
  1. talks like a trained model: mean entropy of its samples between 0.5 and 4 nats; at least half of the
     completions stop before max_new_tokens, and some on <|endoftext|>.
  2. sampler vs trainer: the largest gap between the log-probs common.models.sample drew with and the training
     forward's, over real completion tokens: < 1e-2 in fp32 (a sampler that took the checkpoint's top_k or
     penalty, or another temperature, is off by > 0.1), mean < 0.05 nats under bf16 autocast (max reported).
  3. throughput: generated and trained tokens per second (reported, not checked).
  4. one step of each script at lr 1e-6 in --dtype bfloat16 (sft, dpo, reward_model on long completions, grpo
     and ppo_rlhf with a judge of this file, reinforce with the LLM judge llm:<the model>, ppo_rlhf with the
     reward model reward_model.py just saved): >= 99% of the layers' weights changed (bf16 weights would keep
     ~99.8% of them: fp32 master weights), the model saved in fp32. The embeddings are reported, not checked:
     rows of tokens no sequence holds get no gradient in reward_model, and with sharp logits the rows of
     improbable tokens get gradients below what Adam's eps (1e-5 in ppo_rlhf) lets move an fp32 weight.
  5. step-0 KL in bf16: eval/kl at step 0 and train/kl at step 1 exactly 0 (grpo, reinforce, ppo_rlhf),
     rewards/chosen and rewards/rejected at step 1 exactly 0 (dpo), eval/kl at step 0 exactly 0 (sft, dpo):
     the reference and the eval's starting copy compute what the policy computes before its first update.
  6. gradient checkpointing: each script again with --gradient-checkpointing; its peak memory from the start of
     step 1 (models loaded, step 0 evaluated) to the first optimiser step must be lower (the forward and
     backward; AdamW allocates its state at that step, which may top a one-step run whatever the activations).
     Also the 5. checks again. CUDA: torch.cuda.max_memory_allocated; CPU: the resident set (VmHWM, reset
     through /proc/self/clear_refs after malloc_trim; malloc set to return every block of 64 KB or more).
  7. resume: grpo and dpo (two batches) run 2 steps with a checkpoint after each; the step-1 checkpoint is kept
     and the run's folder resumed from it (--resume), so both step 2's start from the same bits. CPU (fp32):
     metrics after step 1, final weights and Adam's moments identical, bit for bit. CUDA (bf16): the step-2
     training metrics that the forward alone makes (reward, loss, KL, entropy, rewards/*; not grad_norm)
     identical, bit for bit: the sampler and the forward are deterministic on one GPU, given the same weights,
     optimizer, random states and data order; the backward is not (atomic adds in attention and embedding
     gradients), so the weights and Adam's second moments after step 2 may differ in their last bits: fewer
     than 1% of the weights by more than lr/10 and of the moments by more than 1e-3 relative (a lost optimizer
     state puts most moments off by ~2x, and moves many weights by ~lr).
  8. LoRA in bf16: grpo and ppo_rlhf one step with --lora-rank 16 (PEFT must be installed): the reference is
     the model with its adapters off, so eval/kl at step 0 and train/kl at step 1 are exactly 0; model/ is
     PEFT's adapter folder holding only lora_A and lora_B, and B has moved from its zeros; the peak to the first
     optimiser step is reported beside the full run's (the base frozen in bf16, no reference copy, Adam state
     for the adapters only).
Not checked: FSDP2 (--fsdp needs several processes; tests/test_fsdp.py runs 2 CPU processes over gloo); DDP (one GPU is one process; tests/test_ddp.py runs 2 CPU processes over gloo; NCCL needs 2 GPUs).
The report goes to tests/bench/results/gpu_check.json (or --out), rewritten after every check, so a run cut
short leaves what it measured.
"""
import argparse
import contextlib
import ctypes
import gc
import glob
import json
import math
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [ROOT, os.path.dirname(HERE)]

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch.optim.optimizer import register_optimizer_step_pre_hook  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import common.run  # noqa: E402
import dpo  # noqa: E402
import grpo  # noqa: E402
import ppo_rlhf  # noqa: E402
import reinforce  # noqa: E402
import reward_model  # noqa: E402
import sft  # noqa: E402
from common.models import autocast, encode_prompt, load_model_and_tokenizer, sample, sampling_config  # noqa: E402
from common.models import stop_token_ids  # noqa: E402
from local_models import WORDS, chatml_tokenizer, save_random_model  # noqa: E402

# Qwen/Qwen2.5-0.5B-Instruct's shape (config.json: 494,032,768 parameters, tied embeddings) in a Llama: Qwen2 only
# adds biases to q, k and v, and a Qwen2 config makes transformers load the tokenizer as Qwen2's byte-level one,
# which would re-split the word-level test tokenizer's text
QWEN25_05B = dict(arch="llama", hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab_size=151_936,
                  context=32_768)
SMALL = dict(arch="llama", hidden=64, layers=4, heads=4, kv_heads=2, intermediate=256, vocab_size=2_048, context=512)
ENTROPY_NATS, STOP_PER_TOKEN = 2.0, 0.12  # what the trained-like model is tuned to, at temperature 1
SCRIPTS = (sft, reward_model, dpo, grpo, reinforce, ppo_rlhf)


class Report:
    """The report's numbers and each check's PASS/FAIL, rewritten to `path` at every change."""

    def __init__(self, path: str, **head):
        self.path, self.data = path, {**head, "checks": {}}
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def __setitem__(self, key, value):
        self.data[key] = value
        self.save()

    def check(self, name: str, passed: bool, detail: str) -> None:
        self.data["checks"][name] = {"passed": bool(passed), "detail": detail}
        print(f"{'PASS' if passed else 'FAIL'} {name}: {detail}", flush=True)
        self.save()

    def save(self) -> None:
        with open(self.path + ".tmp", "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(self.path + ".tmp", self.path)


# ---- the data: prompts of different lengths, long completions ---------------------------------------------


def write_data(folder: str, words: int, pairs: int, prompt_words: int) -> dict:
    """JSONL files: prompts (a hex, then 0 to prompt_words - 1 words: left padding), eval prompts, SFT rows and
    preference pairs with `words`-word completions (long sequences, where activations weigh), `pairs` training
    pairs (one batch)."""
    prompt = lambda i: (f"Name this paint color: #{i * 2654435 % 0xFFFFFF:06x} "  # noqa: E731
                        + " ".join(WORDS[(i * 5) % 11 : (i * 5) % 11 + (i * 11) % prompt_words]))
    answer = lambda i: " ".join(WORDS[(i * 3 + 2 * j) % len(WORDS)] for j in range(words - i % 7))  # noqa: E731
    rows = {"prompts": [{"prompt": prompt(i)} for i in range(64)],
            "eval_prompts": [{"prompt": prompt(i)} for i in range(64, 80)],
            "sft": [{"prompt": prompt(i), "completion": answer(i)} for i in range(64)],
            "pairs": [{"prompt": prompt(i), "chosen": answer(i), "rejected": answer(i + 1)} for i in range(pairs)],
            "two_batches_of_pairs": [{"prompt": prompt(i), "chosen": answer(i), "rejected": answer(i + 1)}
                                     for i in range(2 * pairs)],
            "eval_pairs": [{"prompt": prompt(i), "chosen": answer(i), "rejected": answer(i + 1)} for i in range(64, 72)]}
    files = {}
    for name, lines in rows.items():
        files[name] = os.path.join(folder, f"{name}.jsonl")
        with open(files[name], "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in lines)
    return files


def prompts_of(path: str) -> list[str]:
    return [json.loads(line)["prompt"] for line in open(path)]


# ---- the model: random init, then sharp logits and early stops -----------------------------------------------


@torch.no_grad()
def final_hidden(model, prompt_ids, prompt_mask, completion_ids=None, stop_ids=()) -> torch.Tensor:
    """The residual before the final norm, divided by its RMS (what the norm's weight multiplies), (n, D) in fp32,
    at the last prompt position and every real completion position (or every real prompt position)."""
    captured = []
    handle = model.model.norm.register_forward_pre_hook(lambda module, args: captured.append(args[0].float()))
    if completion_ids is None:
        ids, mask, keep = prompt_ids, prompt_mask, prompt_mask.bool()
    else:
        real = grpo.completion_mask_from(completion_ids, torch.tensor(stop_ids, device=completion_ids.device))[0].bool()
        ids, mask = torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, real.long()], 1)
        # the positions whose next-token distribution was sampled: P-1+t predicts completion token t
        keep = torch.cat([torch.zeros_like(prompt_mask[:, 1:]).bool(), real, torch.zeros_like(real[:, :1])], 1)
    model(ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0), use_cache=False, logits_to_keep=1)
    handle.remove()
    x = captured[0][keep]
    return x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()


def mean_over_rows(fn, rows: torch.Tensor, chunk: int = 256) -> float:
    return float(sum(fn(rows[i : i + chunk]).sum() for i in range(0, len(rows), chunk)) / len(rows))


def bisect(f, target: float, lo: float, hi: float, rising: bool, steps: int = 24) -> float:
    """x in [lo, hi] with f(x) = target, f monotone, on a log scale."""
    for _ in range(steps):
        mid = math.sqrt(lo * hi)
        if (f(mid) < target) == rising:
            lo = mid
        else:
            hi = mid
    return math.sqrt(lo * hi)


@torch.no_grad()
def tune(model, X: torch.Tensor, d: int, stops: tuple[int, int]) -> tuple[float, float, float]:
    """(s, t, a): the final norm's weight s on every coordinate but d, t on d, and <|endoftext|>'s entry a on d
    (<|im_end|>'s is 1), so that softmax(logits) has ENTROPY_NATS nats and stops with STOP_PER_TOKEN, a third of
    that on <|endoftext|>, on average over the rows of X."""
    E = model.lm_head.weight.float()
    base = X.clone()
    base[:, d] = 0
    Xd, (im_end, endoftext) = X[:, d].clone(), stops

    def entropy(s):
        return mean_over_rows(lambda rows: grpo.entropy((s * rows @ E.T)[None], 1.0), base)

    s = bisect(entropy, ENTROPY_NATS, 0.1, 1000.0, rising=False)
    share = math.log(2)  # <|endoftext|> half as likely as <|im_end|>: a third of the stops

    def stop(t):
        a = 1 - share / (t * float(Xd.mean()))

        def rows_stop(i):
            logits = s * base[i : i + 256] @ E.T
            logits[:, im_end] += t * Xd[i : i + 256]
            logits[:, endoftext] += t * a * Xd[i : i + 256]
            return logits.softmax(-1)[:, [im_end, endoftext]].sum(-1)
        return float(torch.cat([rows_stop(i) for i in range(0, len(base), 256)]).mean())

    t = bisect(stop, STOP_PER_TOKEN, 0.01, 1000.0, rising=True)
    return s, t, 1 - share / (t * float(Xd.mean()))


def build_model(folder: str, shape: dict, prompts: list[str], device: torch.device) -> str:
    """The random-init model with sharp logits and early stops (module docstring), saved in bf16 with Qwen2.5's
    generation_config quirks; returns its folder."""
    tokenizer = chatml_tokenizer(vocab_size=shape["vocab_size"])
    im_end, endoftext = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    generation = dict(repetition_penalty=1.1, top_k=20, top_p=0.8, temperature=0.7, do_sample=True,
                      eos_token_id=[im_end, endoftext])
    path = save_random_model(os.path.join(folder, "model"), tokenizer, generation=generation, dtype=torch.bfloat16,
                             device=device, **shape)
    # the same weights with zero biases on q, k, v, o (attention_bias: o's is the one used)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # not the table of the missing (new) biases
    model = LlamaForCausalLM.from_pretrained(path, attention_bias=True, dtype=torch.float32).to(device)
    hf_logging.set_verbosity(verbosity)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "tied, as Qwen2.5-0.5B"
    d, E = 0, model.model.embed_tokens.weight  # d: the coordinate that carries "stop"
    with torch.no_grad():
        for layer in model.model.layers:
            for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                               layer.self_attn.o_proj):
                projection.bias.zero_()
        E[:, d] = 0  # read by the stop tokens only
        E[im_end, d], E[endoftext, d] = 1.0, 0.8
        config = sampling_config(tokenizer, model, temperature=1.0, max_new_tokens=16)
        ids = tokenizer.pad({"input_ids": [encode_prompt(tokenizer, p) for p in prompts]}, return_tensors="pt")
        prompt_ids, prompt_mask = ids["input_ids"].to(device), ids["attention_mask"].to(device)
        # a constant on coordinate d of the last layer's output, 8x the residual's RMS per coordinate
        model.model.norm.weight.fill_(1.0)
        captured = []
        handle = model.model.norm.register_forward_pre_hook(lambda module, args: captured.append(args[0].float()))
        model(prompt_ids, attention_mask=prompt_mask, use_cache=False, logits_to_keep=1)
        handle.remove()
        residual = captured[0][prompt_mask.bool()]
        model.model.layers[-1].self_attn.o_proj.bias[d] = 8 * float(residual.pow(2).mean().sqrt())
        # tune on the prompts, then on the model's own samples (which the tuning changes: a few rounds)
        for round_ in range(3):
            completions = sample(model, tokenizer, prompts, config)[2] if round_ else None
            X = final_hidden(model, prompt_ids, prompt_mask, completions, config.eos_token_id)
            s, t, a = tune(model, X, d, (im_end, endoftext))
            model.model.norm.weight.fill_(s)
            model.model.norm.weight[d] = t
            E[endoftext, d] = a
    model.to(torch.bfloat16).save_pretrained(path, safe_serialization=True)
    return path


@torch.no_grad()
def talk(model, tokenizer, prompts: list[str], dtype, max_new_tokens: int) -> dict:
    """How the model samples at temperature 1 (the scripts' default): the share of completions that stop before
    max_new_tokens, on which stop id, their mean length, and the mean entropy over real completion tokens."""
    config = sampling_config(tokenizer, model, temperature=1.0, max_new_tokens=max_new_tokens)
    torch.manual_seed(0)
    with autocast(model.device, dtype):
        prompt_ids, prompt_mask, completion_ids = sample(model, tokenizer, prompts, config)
    stop_ids = stop_token_ids(tokenizer, model)  # EOS, the end-of-turn, the model's EOS list
    mask, truncated = grpo.completion_mask_from(completion_ids, torch.tensor(stop_ids, device=completion_ids.device))
    first = torch.where(truncated, -1, mask.sum(1).long() - 1)
    stop_tokens = [int(completion_ids[i, j]) for i, j in enumerate(first.tolist()) if j >= 0]
    with autocast(model.device, dtype):
        _, logits = grpo.forward_logprobs(model, prompt_ids, prompt_mask, completion_ids, mask, 1.0)
    entropy = float((grpo.entropy(logits, 1.0) * mask).sum() / mask.sum())
    return {"stopped_share": 1 - float(truncated.float().mean()), "mean_length": float(mask.sum(1).mean()),
            "stops": {tokenizer.convert_ids_to_tokens(i): stop_tokens.count(i) for i in stop_ids}, "entropy_nats": entropy,
            "prompt_lengths": sorted(set(prompt_mask.sum(1).tolist())), "completions": len(completion_ids)}


# ---- sampler vs trainer, throughput ------------------------------------------------------------------------


def sampler_trainer_gap(model, tokenizer, prompts, dtype, max_new_tokens: int) -> dict:
    """|log-prob the sampler drew with - log-prob the training forward computes| over real completion tokens."""
    config = sampling_config(tokenizer, model, temperature=0.7, max_new_tokens=max_new_tokens)
    torch.manual_seed(0)
    with autocast(model.device, dtype):
        prompt_ids, prompt_mask, completion_ids, sampler = sample(model, tokenizer, prompts, config,
                                                                  return_logprobs=True)
    mask, _ = grpo.completion_mask_from(completion_ids, torch.tensor(config.eos_token_id, device=model.device))
    with torch.no_grad(), autocast(model.device, dtype):
        trainer, _ = grpo.forward_logprobs(model, prompt_ids, prompt_mask, completion_ids, mask, 0.7)
    gap = (trainer - sampler).abs() * mask
    return {"max_abs": float(gap.max()), "mean_abs": float(gap.sum() / mask.sum()), "tokens": int(mask.sum())}


def throughput(model, tokenizer, prompts, dtype, n: int, max_new_tokens: int) -> dict:
    """Generated and trained tokens per second on one batch of n sequences (second of two timed repeats)."""
    prompts = prompts[: n // 8]  # 8 completions of each prompt, as a GRPO group
    config = sampling_config(tokenizer, model, temperature=1.0, max_new_tokens=max_new_tokens)
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    result = {}
    for _ in range(2):  # the first round warms up kernels and the allocator
        sync()
        t0 = time.perf_counter()
        with autocast(model.device, dtype):
            prompt_ids, prompt_mask, completion_ids = sample(model, tokenizer, prompts, config, repeats=8)
        sync()
        t1 = time.perf_counter()
        completion_mask = torch.ones_like(completion_ids)  # every position trained, as the count says
        with autocast(model.device, dtype):
            logprobs, _ = grpo.forward_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, 1.0)
        logprobs.sum().backward()
        sync()
        t2 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        # the positions sampled (rows that stopped sample padding until the last one stops) and trained
        trained = completion_ids.numel() + int(prompt_mask.sum()) * 8
        result = {"generated_tokens_per_s": completion_ids.numel() / (t1 - t0), "trained_tokens_per_s": trained / (t2 - t1),
                  "sequences": len(completion_ids), "completion_tokens": completion_ids.shape[1]}
    return result


# ---- the scripts ----------------------------------------------------------------------------------------------


def text_length(prompts, completions, **kwargs) -> list[float]:
    """The check's judge: the name's length in characters (varies with where the completion stopped)."""
    return [float(len(c)) for c in completions]


JUDGE = f"{os.path.abspath(__file__)}:text_length"


def script_args(name: str, path: str, files: dict, out: str, big: bool, reward_model_dir=None) -> dict:
    """One optimiser step of each script, in bf16, at lr 1e-6."""
    T = 64 if big else 32
    run = dict(model=path, dtype="bfloat16", learning_rate=1e-6, output_dir=out, log_every=1, eval_every=10)
    rl = dict(run, prompts=files["prompts"], eval_prompts=files["eval_prompts"], total_steps=1, eval_size=8,
              judge=JUDGE, max_new_tokens=T)
    pairs = dict(run, data=files["pairs"], eval_data=files["eval_pairs"], batch_size=16 if big else 8, num_epochs=1)
    return {
        "grpo": dict(rl, batch_size=8 if big else 4, group_size=8, micro_batch_size=64 if big else 32),
        "reinforce": dict(rl, batch_size=8 if big else 4, group_size=8, micro_batch_size=64 if big else 32,
                          judge=f"llm:{path}"),
        "ppo_rlhf": dict(rl, batch_size=16, num_minibatches=1, num_ppo_epochs=1,
                         reward_model=reward_model_dir),
        "sft": dict(run, data=files["sft"], total_steps=1, batch_size=16, warmup_steps=0, eval_size=8,
                    max_new_tokens=T, judge=JUDGE),
        "dpo": dict(pairs, warmup_steps=0, eval_size=8, judge=JUDGE, max_new_tokens=T),
        "reward_model": dict(pairs),
    }[name]


def peak_reader(device: torch.device):
    """(reset, allocated now, peak since the reset), in MB: CUDA's allocator, or the resident set on a CPU."""
    if device.type == "cuda":
        return (torch.cuda.reset_peak_memory_stats, lambda: torch.cuda.memory_allocated() / 2**20,
                lambda: torch.cuda.max_memory_allocated() / 2**20)

    def status(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024

    def reset():
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # the heap's free pages back: what a step reuses counts too
        with open("/proc/self/clear_refs", "w") as f:  # "5": VmHWM starts again from the resident set now
            f.write("5")
    return reset, lambda: status("VmRSS"), lambda: status("VmHWM")


@contextlib.contextmanager
def step_memory(device: torch.device):
    """Measures step 1 of a script run inside it: the peak above the memory held when it starts (Run.begin has
    loaded the models and evaluated step 0), up to the first optimiser step and up to the step's end; and the
    whole run's peak (on a CPU the process's resident set, interpreter and all)."""
    reset, now, peak = peak_reader(device)
    marks, begin, end_step = {}, common.run.Run.begin, common.run.Run.end_step

    def begin_then_reset(run, *args, **kwargs):
        out = begin(run, *args, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        marks["setup_peak_mb"] = peak()
        reset()
        marks["start_mb"] = now()
        return out

    def end_step_after_peak(run, *args, **kwargs):
        marks.setdefault("step_mb", peak() - marks["start_mb"])
        return end_step(run, *args, **kwargs)

    def before_first_optimizer_step(*_) -> None:
        marks.setdefault("backward_mb", peak() - marks["start_mb"])

    hook = register_optimizer_step_pre_hook(before_first_optimizer_step)
    common.run.Run.begin, common.run.Run.end_step = begin_then_reset, end_step_after_peak
    reset()
    try:
        yield marks
        marks["run_peak_mb"] = max(marks["setup_peak_mb"], peak())
    finally:
        common.run.Run.begin, common.run.Run.end_step = begin, end_step
        hook.remove()


@contextlib.contextmanager
def patched(owner, name: str, value):
    saved = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


def read_rows(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def saved_weights(folder: str) -> dict:
    return {k: v for path in glob.glob(f"{folder}/*.safetensors") for k, v in load_file(path).items()}


def free_memory(device) -> None:
    """What earlier runs left: a script's models sit in reference cycles (its Run and its eval closure) until
    the garbage collector runs, 16 bytes per parameter and more on the GPU."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_script(script, args: dict, device, saves: bool) -> dict:
    """script.main in this process with step 1's memory measured. No checkpoint is written (12 bytes per
    parameter: 6 GB for the 0.5B model); saves: the model of the last eval only, else none."""
    first_save, save = [], common.run.save_atomic

    def save_after_the_first(*args, **kwargs):  # the eval of step 0 saves the starting weights: not needed
        if saves and first_save:
            save(*args, **kwargs)
        first_save.append(1)

    free_memory(device)
    t0 = time.perf_counter()
    with (patched(common.run.Run, "save_checkpoint", lambda *a, **k: None), step_memory(device) as memory,
          patched(common.run, "save_atomic", save_after_the_first)):
        run_dir = script.main(script.Args(**args))["run_dir"]
    return {"run_dir": run_dir, "rows": read_rows(run_dir), "run_s": time.perf_counter() - t0, **memory}


def kl_at_start(name: str, rows: list[dict]) -> dict:
    """The numbers that must be exactly 0 before the first update, by script (None: not logged)."""
    def at(step, key):
        return next((row[key] for row in rows if row["step"] == step and key in row), None)

    values = {}
    if name in ("grpo", "reinforce", "ppo_rlhf", "sft", "dpo"):
        values["eval/kl@0"] = at(0, "eval/kl")
    if name in ("grpo", "reinforce", "ppo_rlhf"):
        values["train/kl@1"] = at(1, "train/kl")
    if name == "dpo":
        values["rewards/chosen@1"], values["rewards/rejected@1"] = at(1, "rewards/chosen"), at(1, "rewards/rejected")
    return values


# ---- resume ---------------------------------------------------------------------------------------------------


def resume_check(script, args: dict, folder: str, device) -> tuple[bool, dict]:
    """2 steps with a checkpoint after each, the step-1 checkpoint kept aside; then that run's folder, with the
    step-1 checkpoint as its latest, resumed. Returns (passed, numbers)."""
    kept = os.path.join(folder, "step-1")
    save = common.run.Run.save_checkpoint

    def save_and_keep_step_1(run, step, state):
        save(run, step, state)
        if step == 1:  # hard links: the files stay when the run removes the folder at step 2
            shutil.copytree(os.path.join(run.dir, "checkpoints", "step-1"), kept, copy_function=os.link)

    free_memory(device)
    with patched(common.run.Run, "save_checkpoint", save_and_keep_step_1):
        unbroken = script.main(script.Args(**args, output_dir=os.path.join(folder, "unbroken")))["run_dir"]
    free_memory(device)
    resumed = os.path.join(folder, "resumed", os.path.basename(unbroken))
    os.makedirs(os.path.join(resumed, "checkpoints"))
    for name in ("args.json", "metrics.jsonl", "samples.jsonl"):  # logged up to step 2: resume drops the rest
        if os.path.exists(os.path.join(unbroken, name)):
            shutil.copy(os.path.join(unbroken, name), resumed)
    os.rename(kept, os.path.join(resumed, "checkpoints", "step-1"))
    with open(os.path.join(resumed, "checkpoints", "latest"), "w") as f:
        f.write("step-1")
    script.main(script.Args(resume=resumed))
    after = lambda run_dir: [{k: v for k, v in row.items() if not k.startswith("perf/")}  # noqa: E731
                             for row in read_rows(run_dir) if row["step"] > 1]
    rows, expected = after(resumed), after(unbroken)
    weights, expected_weights = saved_weights(os.path.join(resumed, "model")), saved_weights(os.path.join(unbroken, "model"))
    diffs = torch.cat([(weights[k].float() - expected_weights[k].float()).abs().flatten() for k in expected_weights])
    # Adam's second moments after step 2 (the last checkpoint): 0.999 v1 + 0.001 g2^2, far off if v1 was lost
    moments = [torch.load(os.path.join(run_dir, "checkpoints", "step-2", "optimizer.pt"), map_location="cpu",
                          weights_only=True)["state"] for run_dir in (resumed, unbroken)]
    v, v_expected = (torch.cat([state[i]["exp_avg_sq"].flatten() for i in sorted(state)]) for state in moments)
    relative = (v - v_expected).abs() / v_expected.abs().clamp(min=1e-30)
    lr = args["learning_rate"]
    numbers = {"steps_compared": sorted({row["step"] for row in expected}), "weights_max_abs_diff": float(diffs.max()),
               "weights_share_above_lr_over_10": float((diffs > lr / 10).float().mean()), "learning_rate": lr,
               "adam_v_share_off_by_1e-3": float((relative > 1e-3).float().mean())}
    if device.type != "cuda":
        numbers["rows_equal"], numbers["adam_state_equal"] = rows == expected, bool(torch.equal(v, v_expected))
        return rows == expected and bool(diffs.max() == 0) and numbers["adam_state_equal"], numbers
    # CUDA: the training rows' forward-made metrics bit for bit; the weights and Adam's moments within the noise
    # of the backward
    train = lambda rs: [{k: x for k, x in r.items() if k != "train/grad_norm"} for r in rs if "perf/train_s" not in r  # noqa: E731
                        and not any(k.startswith("eval/") for k in r)]
    numbers["train_rows_equal"] = train(rows) == train(expected) != []
    numbers["eval_rows_equal"] = rows == expected
    return (numbers["train_rows_equal"] and numbers["weights_share_above_lr_over_10"] < 0.01
            and numbers["adam_v_share_off_by_1e-3"] < 0.01), numbers


# ---- main -----------------------------------------------------------------------------------------------------


def changed_shares(initial: dict, after: dict) -> tuple[float, float]:
    """The share of the weights one step changed: of all, and of the layers' (the embeddings, tied to the LM head,
    left out); the reward model's new head has no counterpart in `initial`."""
    shared = [k for k in after if k in initial]
    changed = {k: int((after[k] != initial[k]).sum()) for k in shared}
    layers = [k for k in shared if "embed_tokens" not in k]
    return tuple(sum(changed[k] for k in keys) / sum(initial[k].numel() for k in keys) for keys in (shared, layers))


def check_scripts(report: Report, path: str, files: dict, folder: str, big: bool, device) -> None:
    """4-6: each script one step, then again with --gradient-checkpointing; a run that raises is a failed check
    (the others still run)."""
    initial = {k: v.float() for k, v in saved_weights(path).items()}
    runs_dir, scripts, errors, reward_model_dir = os.path.join(folder, "runs"), {}, {}, None
    for variant in ("plain", "checkpointing"):
        for script in SCRIPTS:
            name = script.__name__
            args = dict(script_args(name, path, files, runs_dir, big, reward_model_dir),
                        gradient_checkpointing=variant == "checkpointing")
            try:
                run = run_script(script, args, device, saves=variant == "plain")
            except Exception as e:  # noqa: BLE001 - e.g. out of memory: reported, and the next run goes on
                errors[f"{name} ({variant})"] = f"{type(e).__name__}: {str(e)[:300]}"
                print(f"{name} ({variant}) failed: {errors[f'{name} ({variant})']}", flush=True)
                continue
            entry = scripts.setdefault(name, {})
            entry[variant] = {k: v for k, v in run.items() if k not in ("rows", "run_dir")}
            entry[variant]["kl_at_start"] = kl_at_start(name, run["rows"])
            entry[variant]["step_s"] = next((r["perf/step_s"] for r in run["rows"] if "perf/step_s" in r), None)
            if variant == "plain":
                after = saved_weights(os.path.join(run["run_dir"], "model"))
                entry["changed_share"], entry["changed_share_layers"] = changed_shares(initial, after)
                entry["saved_dtype"] = str(next(iter(after.values())).dtype)
            print(f"{name} ({variant}): step {entry[variant]['step_s']:.2f} s, peak to the first optimiser step "
                  f"{run['backward_mb']:.0f} MB above the step's start, the run's {run['run_peak_mb']:.0f} MB, "
                  f"run {run['run_s']:.0f} s", flush=True)
            report["scripts"], report["errors"] = scripts, errors
            if name == "reward_model" and variant == "plain":
                reward_model_dir = os.path.join(run["run_dir"], "model")  # ppo_rlhf's reward model
            else:
                shutil.rmtree(run["run_dir"], ignore_errors=True)
        if variant == "plain":
            plain = {s: e for s, e in scripts.items() if "changed_share" in e}
            saved = sorted({e["saved_dtype"] for e in plain.values()})
            report.check("one bf16 step changes the weights",
                         len(plain) == 6 and all(e["changed_share_layers"] >= 0.99 for e in plain.values())
                         and saved == ["torch.float32"],
                         "changed share of the layers' weights (of all, embeddings included) "
                         + ", ".join(f"{s} {e['changed_share_layers']:.4f} ({e['changed_share']:.4f})" for s, e in plain.items())
                         + f"; saved in {saved}")
    kls = {f"{s} ({v})": e[v]["kl_at_start"] for s, e in scripts.items() for v in ("plain", "checkpointing") if v in e}
    nonzero = {run: values for run, values in kls.items() if any(x != 0.0 for x in values.values())}
    report.check("step-0 KL in bf16", not nonzero and not errors,
                 ("all exactly 0" if not nonzero else f"not 0: {nonzero}") + (f"; runs failed: {errors}" if errors else ""))
    both = {s: (e["plain"]["backward_mb"], e["checkpointing"]["backward_mb"]) for s, e in scripts.items()
            if "plain" in e and "checkpointing" in e}
    report.check("gradient checkpointing lowers the peak", len(both) == 6 and all(c < p for p, c in both.values()),
                 ", ".join(f"{s} {p:.0f} -> {c:.0f} MB" for s, (p, c) in both.items()) + " (to the first optimiser step)")
    if reward_model_dir:
        shutil.rmtree(os.path.dirname(reward_model_dir), ignore_errors=True)


def check_resume(report: Report, path: str, files: dict, folder: str, big: bool, device) -> None:
    """7: the step-1 checkpoint of grpo and dpo, resumed, against the unbroken run."""
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    report["resume"] = {}
    for script in (grpo, dpo):
        name = script.__name__
        args = dict(script_args(name, path, files, "", big), dtype=dtype, save_every=1)
        # dpo: two batches of one epoch (its order in the checkpoint's state); two of the same batch would give
        # Adam two near-equal gradients, whose update a lost optimizer state leaves the same
        args = dict(args, total_steps=2) if script is grpo else dict(args, data=files["two_batches_of_pairs"])
        args.pop("output_dir")
        where = tempfile.mkdtemp(dir=folder)
        try:
            passed, numbers = resume_check(script, args, where, device)
        except Exception as e:  # noqa: BLE001
            passed, numbers = False, {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        shutil.rmtree(where, ignore_errors=True)
        report.data["resume"][name] = numbers
        report.check(f"resume {name}", passed, f"{dtype}: {json.dumps(numbers)}")


def check_lora(report: Report, path: str, files: dict, folder: str, big: bool, device) -> None:
    """8: grpo and ppo_rlhf one step with --lora-rank 16 in bf16."""
    report["lora"], passed = {}, True
    for script in (grpo, ppo_rlhf):
        name = script.__name__
        args = dict(script_args(name, path, files, os.path.join(folder, "runs-lora"), big), lora_rank=16)
        try:
            run = run_script(script, args, device, saves=True)
        except Exception as e:  # noqa: BLE001
            report.data["lora"][name], passed = {"error": f"{type(e).__name__}: {str(e)[:300]}"}, False
            continue
        adapter = saved_weights(os.path.join(run["run_dir"], "model"))
        kl = kl_at_start(name, run["rows"])
        numbers = dict(kl_at_start=kl, adapter_tensors=len(adapter), only_adapters=all("lora_" in k for k in adapter),
                       lora_B_max=max((float(v.abs().max()) for k, v in adapter.items() if "lora_B" in k), default=0.0),
                       backward_mb=run["backward_mb"], full_backward_mb=report.data["scripts"][name]["plain"]["backward_mb"])
        report.data["lora"][name] = numbers
        passed &= numbers["only_adapters"] and numbers["lora_B_max"] > 0 and len(kl) == 2
        passed &= all(value == 0.0 for value in kl.values())
        shutil.rmtree(run["run_dir"], ignore_errors=True)
    report.check("LoRA in bf16", passed, json.dumps(report.data["lora"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="a small config (what the tests run on CPU)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "gpu_check.json"))
    cli = parser.parse_args()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cli.device == "auto" else cli.device)
    if device.type == "cpu":  # every block of 64 KB or more its own mapping, unmapped when freed: RSS = live tensors
        ctypes.CDLL("libc.so.6").mallopt(-3, 65536)  # M_MMAP_THRESHOLD
    big = not cli.small
    shape = QWEN25_05B if big else SMALL
    folder = tempfile.mkdtemp(prefix="gpu_check_")
    t_start = time.perf_counter()
    report = Report(cli.out, device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                    torch=torch.__version__, config=shape, date=time.strftime("%Y-%m-%d"), small=cli.small)
    print(json.dumps(report.data), flush=True)
    files = write_data(folder, words=48, pairs=16 if big else 8, prompt_words=28 if big else 14)
    prompts, T = prompts_of(files["prompts"]), 64 if big else 32

    # 1. the model, and how it talks
    path = build_model(folder, shape, prompts[:32], device)
    model, tokenizer = load_model_and_tokenizer(path, cli.device)  # as the scripts hold it: fp32 weights
    talks = report["talks"] = talk(model, tokenizer, prompts[: 64 if big else 32], torch.bfloat16, T)
    lengths = talks["prompt_lengths"]
    report.check("talks like a trained model", 0.5 <= talks["entropy_nats"] <= 4 and talks["stopped_share"] >= 0.5
                 and talks["stops"].get("<|endoftext|>", 0) > 0,
                 f"entropy {talks['entropy_nats']:.2f} nats, {talks['stopped_share']:.0%} of {talks['completions']} "
                 f"completions stop before {T} tokens (mean length {talks['mean_length']:.1f}; stops {talks['stops']}), "
                 f"prompts of {len(lengths)} lengths ({min(lengths)}-{max(lengths)} tokens)")

    # 2-3. sampler vs trainer; throughput
    n, gap_T = (64, 128) if big else (16, 16)
    gaps = report["sampler_trainer_gap"] = {
        str(dtype).split(".")[1]: sampler_trainer_gap(model, tokenizer, prompts[:n], dtype, gap_T)
        for dtype in (torch.float32, torch.bfloat16)}
    report.check("sampler vs trainer", gaps["float32"]["max_abs"] < 1e-2 and gaps["bfloat16"]["mean_abs"] < 0.05,
                 f"fp32 max {gaps['float32']['max_abs']:.1e}, bf16 mean {gaps['bfloat16']['mean_abs']:.1e} / "
                 f"max {gaps['bfloat16']['max_abs']:.1e} nats over {gaps['float32']['tokens']} tokens")
    report["throughput_bf16"] = throughput(model, tokenizer, prompts, torch.bfloat16, n, gap_T)
    speed = report.data["throughput_bf16"]
    print(f"throughput, bf16 autocast: generated {speed['generated_tokens_per_s']:,.0f} tokens/s, trained "
          f"{speed['trained_tokens_per_s']:,.0f} tokens/s ({speed['sequences']} sequences)", flush=True)
    del model
    free_memory(device)

    # 4-7. the scripts, checkpointing, the step-0 KL; resume
    check_scripts(report, path, files, folder, big, device)
    check_resume(report, path, files, folder, big, device)
    check_lora(report, path, files, folder, big, device)

    report["total_s"] = time.perf_counter() - t_start
    failed = [name for name, c in report.data["checks"].items() if not c["passed"]]
    print(f"total {report.data['total_s']:.0f} s; " + (f"FAILED: {', '.join(failed)}" if failed else "all checks passed"),
          flush=True)
    shutil.rmtree(folder, ignore_errors=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
