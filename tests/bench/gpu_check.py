"""The real-model check, one command: a random-init model with Qwen2.5-0.5B's shape, nothing downloaded.

    python tests/bench/gpu_check.py            # on a CUDA machine: bf16 autocast, the 0.5B shape, < 5 min on one GPU
    python tests/bench/gpu_check.py --small    # anywhere (CPU here): the same checks on a small config, ~1 min

It writes the model's config, a 151,936-token ChatML tokenizer (end-of-turn <|im_end|> is not EOS) and a
generation_config with the quirks of Qwen2.5-0.5B-Instruct's (repetition_penalty 1.1, top_k 20, top_p 0.8,
temperature 0.7, EOS ids [<|im_end|>, <|endoftext|>]) into a temporary folder, saves the random weights in bf16
as the hub checkpoint is, then prints:
  - sampler vs trainer: the largest gap between the log-probs generate sampled with (its scores) and those the
    training forward recomputes, over real completion tokens, in fp32 and under bf16 autocast;
  - throughput: generated tokens per second (KV cache, plain sampling) and trained tokens per second (forward +
    backward of grpo.py's log-probs) on one batch;
  - each of the six scripts, one step at lr 1e-6 in --dtype bfloat16: the share of the trained parameters that
    changed, the step time and the peak GPU memory.
Results go to tests/bench/results/gpu_check.json (or --out).
"""
import argparse
import glob
import json
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

import dpo  # noqa: E402
import grpo  # noqa: E402
import ppo_rlhf  # noqa: E402
import reinforce  # noqa: E402
import reward_model  # noqa: E402
import sft  # noqa: E402
from common.models import autocast, load_model_and_tokenizer, sample, sampling_config  # noqa: E402
from local_models import WORDS, chatml_tokenizer, save_random_model  # noqa: E402

# Qwen/Qwen2.5-0.5B-Instruct's shape (config.json: 494,032,768 parameters, tied embeddings) in a Llama: Qwen2 only
# adds biases to q, k and v, and a Qwen2 config makes transformers load the tokenizer as Qwen2's byte-level one,
# which would re-split the word-level test tokenizer's text
QWEN25_05B = dict(arch="llama", hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab_size=151_936,
                  context=32_768)
SMALL = dict(arch="llama", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab_size=8_192, context=512)


def weights(folder: str) -> dict:
    return {k: v.float() for path in glob.glob(f"{folder}/*.safetensors") for k, v in load_file(path).items()}


def sampler_trainer_gap(model, tokenizer, dtype, n: int, max_new_tokens: int, device) -> tuple[float, int]:
    """Max |log-prob the sampler used - log-prob the training forward computes| over real completion tokens."""
    prompts = [f"Name this paint color: #{i:06x}" for i in range(0, 0xFFFFFF, 0xFFFFFF // n)][:n]
    config = sampling_config(tokenizer, model, temperature=0.7, max_new_tokens=max_new_tokens)
    torch.manual_seed(0)
    with autocast(device, dtype):
        prompt_ids, prompt_mask, completion_ids, sampler = sample(model, tokenizer, prompts, config,
                                                                  return_logprobs=True)
    mask, _ = grpo.completion_mask_from(completion_ids, torch.tensor(config.eos_token_id, device=device))
    with torch.no_grad(), autocast(device, dtype):
        trainer, _ = grpo.forward_logprobs(model, prompt_ids, prompt_mask, completion_ids, mask, 0.7)
    return float(((trainer - sampler).abs() * mask).max()), int(mask.sum())


def throughput(model, tokenizer, dtype, n: int, max_new_tokens: int, device) -> dict:
    """Generated and trained tokens per second on one batch of n sequences (second of two timed repeats)."""
    prompts = ["Name this paint color: #d48475"] * (n // 8)  # 8 completions of each prompt, as a GRPO group
    config = sampling_config(tokenizer, model, temperature=1.0, max_new_tokens=max_new_tokens)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    result = {}
    for _ in range(2):  # the first round warms up kernels and the allocator
        sync()
        t0 = time.perf_counter()
        with autocast(device, dtype):
            prompt_ids, prompt_mask, completion_ids = sample(model, tokenizer, prompts, config, repeats=8)
        sync()
        t1 = time.perf_counter()
        P = prompt_ids.shape[1]
        completion_mask = torch.ones_like(completion_ids)  # every position trained, as the count says
        with autocast(device, dtype):
            logprobs, _ = grpo.forward_logprobs(model, prompt_ids, prompt_mask, completion_ids,
                                                completion_mask, 1.0)
        logprobs.sum().backward()
        sync()
        t2 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        # the positions sampled (rows that stopped sample padding until the last one stops) and trained
        result = {"generated_tokens_per_s": completion_ids.numel() / (t1 - t0),
                  "trained_tokens_per_s": (completion_ids.numel() + P * len(completion_ids)) / (t2 - t1)}
    return result


def text_length(prompts, completions, **kwargs) -> list[float]:
    """The check's judge: the name's length in characters. A random-init model says no real words, which
    every built-in judge of names scores alike (-1: nothing to read), so its pairs would all tie."""
    return [float(len(c)) for c in completions]


JUDGE = f"{os.path.abspath(__file__)}:text_length"


def script_args(name: str, folder: str, data: str, big: bool) -> dict:
    """One optimiser step of each script, in bf16, at lr 1e-6, on small batches (a real run uses more)."""
    T = 64 if big else 8
    common = dict(model=folder, dtype="bfloat16", learning_rate=1e-6, output_dir=os.path.join(folder, "runs"))
    rl = dict(total_steps=1, eval_size=8, judge=JUDGE, max_new_tokens=T, log_every=1)
    return {**common, **{
        "grpo": dict(rl, batch_size=8 if big else 2, group_size=8 if big else 4, micro_batch_size=64 if big else 8),
        "reinforce": dict(rl, batch_size=8 if big else 2, group_size=8 if big else 4, micro_batch_size=64 if big else 8),
        "ppo_rlhf": dict(rl, batch_size=16 if big else 4, num_minibatches=1, num_ppo_epochs=1),
        "sft": dict(data=data, total_steps=1, batch_size=16 if big else 8, warmup_steps=0, eval_size=8,
                    max_new_tokens=T, log_every=1, judge=JUDGE),
        "dpo": dict(num_prompts=64 if big else 16, eval_pairs=8, batch_size=16 if big else 8, num_epochs=1,
                    warmup_steps=0, eval_size=8, judge=JUDGE, max_new_tokens=T, log_every=1),
        "reward_model": dict(num_prompts=64 if big else 16, eval_prompts=8, batch_size=16 if big else 8, num_epochs=1,
                             judge=JUDGE, log_every=1),
    }[name]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="a small config (what the tests run on CPU)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "gpu_check.json"))
    cli = parser.parse_args()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cli.device == "auto" else cli.device)
    big = not cli.small
    shape = QWEN25_05B if big else SMALL
    folder = tempfile.mkdtemp(prefix="gpu_check_")
    t_start = time.perf_counter()
    tokenizer = chatml_tokenizer(vocab_size=shape["vocab_size"])
    im_end, endoftext = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    generation = dict(repetition_penalty=1.1, top_k=20, top_p=0.8, temperature=0.7, do_sample=True,
                      eos_token_id=[im_end, endoftext])
    path = save_random_model(os.path.join(folder, "model"), tokenizer, generation=generation, dtype=torch.bfloat16,
                             device=device, **shape)
    data = os.path.join(folder, "sft.jsonl")
    with open(data, "w") as f:
        f.writelines(json.dumps({"prompt": f"Name this paint color: #{i * 2654435 % 0xFFFFFF:06x}",
                                 "completion": f"{WORDS[i % 20]} {WORDS[(i * 7) % 20]}"}) + "\n" for i in range(64))
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "config": shape, "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(report), flush=True)

    # 1-2. sampler vs trainer, throughput: the trained model as the scripts hold it (fp32 weights)
    model, tokenizer = load_model_and_tokenizer(path, cli.device)
    n, T = (64, 128) if big else (16, 16)
    report["sampler_trainer_gap"] = {}
    for dtype in (torch.float32, torch.bfloat16):
        gap, tokens = sampler_trainer_gap(model, tokenizer, dtype, n, T, device)
        report["sampler_trainer_gap"][str(dtype).split(".")[1]] = {"max_abs": gap, "tokens": tokens}
        print(f"sampler vs trainer log-probs, {dtype}: largest gap {gap:.2e} over {tokens} tokens", flush=True)
    report["throughput_bf16"] = throughput(model, tokenizer, torch.bfloat16, n, T, device)
    print("throughput, bf16 autocast:", json.dumps(report["throughput_bf16"]), flush=True)
    del model

    # 3. the six scripts, one step each
    initial = weights(path)
    report["scripts"] = {}
    for script in (sft, reward_model, dpo, grpo, reinforce, ppo_rlhf):
        name = script.__name__
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        run_dir = script.main(script.Args(**script_args(name, path, data, big)))["run_dir"]
        seconds = time.perf_counter() - t0
        after = weights(os.path.join(run_dir, "model"))
        shared = [k for k in after if k in initial]  # the reward model's new head has no counterpart
        changed = sum(int((after[k] != initial[k]).sum()) for k in shared) / sum(initial[k].numel() for k in shared)
        rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
        step_s = next((r["perf/step_s"] for r in rows if "perf/step_s" in r), float("nan"))
        report["scripts"][name] = {"changed_share": changed, "step_s": step_s, "run_s": seconds,
                                   "saved_dtype": str(next(iter(load_file(glob.glob(f"{run_dir}/model/*.safetensors")[0]).values())).dtype),
                                   "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}
        print(f"{name:13s} changed {changed:.4f} of the weights, step {step_s:.2f} s, run {seconds:.0f} s"
              + (f", peak {report['scripts'][name]['peak_gpu_gb']:.1f} GiB" if device.type == "cuda" else ""), flush=True)
        shutil.rmtree(run_dir, ignore_errors=True)
    report["total_s"] = time.perf_counter() - t_start
    print(f"total {report['total_s']:.0f} s", flush=True)
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(os.path.dirname(os.path.abspath(cli.out)), exist_ok=True)
    with open(cli.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
