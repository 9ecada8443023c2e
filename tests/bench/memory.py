"""Peak memory of one training step on a CPU: each of the six scripts with and without --gradient-checkpointing,
and the logging step's entropy over Qwen2.5's 151,936-token vocabulary before and after its blocks were freed.

(a) checkpointing: one step (fp32) of each script on a random-init Llama deep and long enough that the
    activations dominate: 8 layers, hidden 256, MLP 1,024, a 1,024-token vocabulary, prompts of 16 to 43 tokens
    (left padded), 128-token completions (grpo, reinforce: 2 prompts x 8; ppo_rlhf: 16 prompts), 120-word
    completions (sft: 16 rows; dpo, reward_model: 8 pairs, 16 sequences).
(b) entropy: one GRPO logging step (4 prompts x 8 completions of 64 tokens) on a random-init Llama with hidden
    64, 2 layers and 151,936 tokens, so that the logits dominate; fp32 by default, since a CPU without bf16
    instructions (this one: AVX2) emulates bf16 matmuls, 10x slower (--dtype bfloat16: ~2.5 min a run alone).
    Three versions of grpo.py:
      whole   log-probs and entropy over the whole (N, T, V) in fp32 (before the blocks);
      list    log-probs in blocks; the entropy's fp32 log-softmax blocks built in one list comprehension, all
              alive at once (before 2026-12-07);
      blocks  grpo.py as it is: each entropy block reduced before the next.

(c) sharding: one GRPO step (beta 0.1: with its reference) on a random-init Llama big enough that the weights
    dominate (8 layers, hidden 1,024, MLP 4,096, a 1,024-token vocabulary: 136M parameters, 0.5 GB in fp32),
    2 prompts x 4 completions of up to 16 tokens, fp32: full fine-tuning in one process (16 bytes per trained
    parameter and 4 for the reference copy: 20 predicted), --lora-rank 16 in one process (the base's 4 bytes,
    no reference copy; on a GPU the base would be bf16, 2), and --fsdp under torchrun with 2 processes (16/2
    per trained parameter, 4/2 for the sharded reference, plus one gathered layer). Reported per process:
    its peak resident set above where it stood before the model was loaded (torch imported), and the ratios
    to full fine-tuning's.

Each measurement runs in a fresh process. It reads /proc/self/status and resets the peak resident set
(/proc/self/clear_refs) where the step starts (models loaded, step-0 eval done), and reports, above the resident
set there: the step's peak; the peak up to the first optimiser step (forward and backward: AdamW allocates its
two fp32 moments at its first step, which, for a step taken once, can be the peak whatever the activations);
in (b) also the entropy call's own peak above its start. And the process's peak resident set (interpreter, torch
and all: what ru_maxrss gives, kept across the resets, which reset ru_maxrss too). MALLOC_MMAP_THRESHOLD_=65536:
every tensor of 64 KB or more is its own mapping, returned when freed, so the resident set follows the tensors.

    python tests/bench/memory.py                     # ~4 min on 2 CPU cores; writes results/memory.json
    python tests/bench/memory.py --only entropy      # or checkpointing
    python tests/bench/memory.py --only entropy --dtype bfloat16 --out /tmp/memory_bf16.json   # ~5 min
    python tests/bench/memory.py --only sharding --jobs 1 --out /tmp/memory_sharding.json      # ~2 min
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [ROOT, os.path.dirname(HERE)]
SCRIPTS = ("sft", "reward_model", "dpo", "grpo", "reinforce", "ppo_rlhf")


# ---- the code before each fix, put back in the "whole" and "list" runs ----------------------------------


def whole_token_logprobs(logits, tokens, temperature):
    """grpo.py before the blocks: the whole (N, T, V) in fp32 at once, kept for backward."""
    import torch
    return torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def whole_entropy(logits, temperature):
    import torch
    with torch.no_grad():
        logp = torch.log_softmax(logits.float() / temperature, dim=-1)
        return -(logp.exp() * logp).sum(-1)


def list_entropy(logits, temperature):
    """grpo.py's entropy before 2026-12-07: blocks, but every fp32 block built before the first is reduced."""
    import torch
    import grpo
    with torch.no_grad():
        rows = max(1, grpo.LOGITS_PER_BLOCK // max(1, logits.shape[1] * logits.shape[2]))
        blocks = [torch.log_softmax(block.float() / temperature, dim=-1) for block in logits.split(rows)]
        return torch.cat([-(logp.exp() * logp).sum(-1) for logp in blocks])


# ---- measuring, in the child process ---------------------------------------------------------------------


def status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": the peak resident set (VmHWM) starts again from now
        f.write("5")


def child(cli) -> None:
    """One step of cli.script in this process; prints what it measured as one JSON line."""
    import importlib

    import torch
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from common.run import Run

    torch.set_num_threads(cli.threads)
    script = importlib.import_module(cli.script)
    marks = {"held": 0.0, "process": 0.0}  # held: the step's peak before a reset inside it (the entropy's)

    def peak() -> float:
        return max(status_mb("VmHWM"), marks["held"])

    def reset() -> None:  # the process's peak so far is kept: a reset also resets ru_maxrss
        marks["process"] = max(marks["process"], status_mb("VmHWM"))
        reset_peak()

    begin, end_step = Run.begin, Run.end_step

    def begin_then_reset(run, *args, **kwargs):  # the step starts once the models are loaded and step 0 evaluated
        out = begin(run, *args, **kwargs)
        marks["loaded"] = status_mb("VmRSS")
        reset()
        return out

    def end_step_after_peak(run, *args, **kwargs):
        marks.setdefault("step", peak())
        return end_step(run, *args, **kwargs)

    def before_first_optimizer_step(*_) -> None:
        marks.setdefault("backward", peak())

    Run.begin, Run.end_step = begin_then_reset, end_step_after_peak
    register_optimizer_step_pre_hook(before_first_optimizer_step)
    if cli.variant == "whole":
        script.token_logprobs = whole_token_logprobs
    if cli.variant in ("whole", "list", "blocks"):
        entropy = {"whole": whole_entropy, "list": list_entropy}.get(cli.variant, script.entropy)

        def measured_entropy(logits, temperature):  # its own peak, then the step's peak goes on from it
            marks["held"], start = peak(), status_mb("VmRSS")
            reset()
            out = entropy(logits, temperature)
            marks["entropy"] = max(marks.get("entropy", 0.0), status_mb("VmHWM") - start)
            return out

        script.entropy = measured_entropy
    args = json.loads(cli.args)
    t0 = time.perf_counter()
    if cli.variant in ("full", "lora", "fsdp"):  # (c): the whole process's peak above its start
        start = status_mb("VmRSS")
        script.main(script.Args(**args))
        print(json.dumps({"seconds": time.perf_counter() - t0, "start_mb": start,
                          "peak_above_start_mb": max(marks["process"], status_mb("VmHWM")) - start}))
        return
    script.main(script.Args(**args, gradient_checkpointing=cli.variant == "checkpointing"))
    process_peak = max(marks["process"], status_mb("VmHWM"))  # = ru_maxrss had nothing been reset
    result = {"seconds": time.perf_counter() - t0, "process_peak_mb": process_peak,
              "loaded_mb": marks["loaded"], "step_above_loaded_mb": marks["step"] - marks["loaded"],
              "backward_above_loaded_mb": marks["backward"] - marks["loaded"]}
    if "entropy" in marks:
        result["entropy_call_mb"] = marks["entropy"]
    print(json.dumps(result))


# ---- the runs ----------------------------------------------------------------------------------------------


def write_data(folder: str, words: int) -> dict:
    """Prompts of different lengths (a hex, then 0-27 words), SFT rows and preference pairs with `words`-word
    completions; returns the files."""
    from local_models import WORDS
    prompts = [f"Name this paint color: #{i * 2654435 % 0xFFFFFF:06x} " + " ".join(WORDS[: (i * 11) % 28])
               for i in range(64)]
    answer = lambda i: " ".join(WORDS[(i * 3 + j) % len(WORDS)] for j in range(words))  # noqa: E731
    files = {name: os.path.join(folder, f"{name}.jsonl") for name in ("prompts", "sft", "pairs")}
    rows = {"prompts": [{"prompt": p} for p in prompts],
            "sft": [{"prompt": p, "completion": answer(i)} for i, p in enumerate(prompts)],
            "pairs": [{"prompt": p, "chosen": answer(i), "rejected": answer(i + 1)} for i, p in enumerate(prompts)]}
    for name, path in files.items():
        with open(path, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows[name])
    return files


def checkpointing_args(script: str, model: str, files: dict, out: str) -> dict:
    run = dict(model=model, dtype="float32", learning_rate=1e-5, output_dir=out, log_every=1, eval_every=10)
    rl = dict(run, prompts=files["prompts"], total_steps=1, eval_size=2, judge="correct", max_new_tokens=128)
    return {"grpo": dict(rl, batch_size=2, group_size=8, micro_batch_size=16),
            "reinforce": dict(rl, batch_size=2, group_size=8, micro_batch_size=16),
            "ppo_rlhf": dict(rl, batch_size=16, num_minibatches=1, num_ppo_epochs=1),
            "sft": dict(run, data=files["sft"], total_steps=1, batch_size=16, warmup_steps=0, eval_size=2,
                        max_new_tokens=8, judge="correct"),
            "dpo": dict(run, data=files["pairs"], batch_size=8, num_epochs=1, warmup_steps=0, eval_size=2,
                        max_new_tokens=8, judge="correct"),
            "reward_model": dict(run, data=files["pairs"], batch_size=8, num_epochs=1)}[script]


def entropy_args(model: str, out: str, dtype: str) -> dict:
    return dict(model=model, dtype=dtype, learning_rate=1e-5, output_dir=out, total_steps=1, batch_size=4,
                group_size=8, micro_batch_size=32, max_new_tokens=64, eval_size=2, eval_every=10, log_every=1,
                judge="correct")


def sharding_args(model: str, out: str, variant: str) -> dict:
    flags = {"lora": dict(lora_rank=16), "fsdp": dict(fsdp=True)}.get(variant, {})
    return dict(model=model, dtype="float32", learning_rate=1e-5, output_dir=out, total_steps=1, batch_size=2,
                group_size=4, micro_batch_size=8, max_new_tokens=16, eval_size=2, eval_every=10, log_every=1,
                judge="correct", **flags)


def run_child(script: str, variant: str, args: dict, threads: int) -> dict:
    command = [sys.executable, __file__, "--child", script, "--variant", variant, "--args", json.dumps(args),
               "--threads", str(threads)]
    if variant == "fsdp":  # two processes; each prints its own line, the larger peak is reported
        command[1:1] = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(threads))
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    if done.returncode:
        sys.exit(f"{script} {variant}:\n{done.stderr[-3000:]}")
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return {"script": script, "variant": variant, **max(lines, key=lambda r: r.get("peak_above_start_mb", 0))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["checkpointing", "entropy", "sharding"])
    parser.add_argument("--jobs", type=int, default=2, help="child processes at a time (each measures itself)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per child")
    parser.add_argument("--dtype", default="float32", help="of the entropy runs (bfloat16: ~7 min a run here)")
    parser.add_argument("--child", dest="script", choices=SCRIPTS)
    parser.add_argument("--variant", choices=["plain", "checkpointing", "whole", "list", "blocks", "full", "lora",
                                              "fsdp"])  # fmt: skip
    parser.add_argument("--args", help="the child's script.Args as JSON")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "memory.json"))
    cli = parser.parse_args()
    if cli.script:
        return child(cli)

    import torch
    from local_models import chatml_tokenizer, save_random_model
    folder, t0 = tempfile.mkdtemp(prefix="memory_"), time.perf_counter()
    results = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "threads": cli.threads,
               "command": " ".join(["python tests/bench/memory.py", *sys.argv[1:]])}
    jobs = []
    if cli.only == "sharding":
        model = save_random_model(os.path.join(folder, "big"), chatml_tokenizer(vocab_size=1024), hidden=1024,
                                  layers=8, heads=8, intermediate=4096, context=256)
        results["sharding_model"] = dict(vocab=1024, hidden=1024, layers=8, heads=8, intermediate=4096)
        jobs += [("grpo", variant, sharding_args(model, os.path.join(folder, f"runs-{variant}"), variant))
                 for variant in ("full", "lora", "fsdp")]
    if cli.only not in ("checkpointing", "sharding"):
        vocab = 151_936
        model = save_random_model(os.path.join(folder, "wide"), chatml_tokenizer(vocab_size=vocab), hidden=64,
                                  layers=2, heads=2, intermediate=128, context=256)
        results["entropy_model"] = dict(vocab=vocab, hidden=64, layers=2, sequences=32, completion_tokens=64, dtype=cli.dtype,
                                        fp32_logits_copy_mb=32 * 64 * vocab * 4 / 2**20)
        jobs += [("grpo", variant, entropy_args(model, os.path.join(folder, f"runs-{variant}"), cli.dtype))
                 for variant in ("whole", "list", "blocks")]
    if cli.only not in ("entropy", "sharding"):
        files = write_data(folder, words=120)
        model = save_random_model(os.path.join(folder, "deep"), chatml_tokenizer(vocab_size=1024), hidden=256,
                                  layers=8, heads=4, intermediate=1024, context=512)
        results["checkpointing_model"] = dict(vocab=1024, hidden=256, layers=8, heads=4, intermediate=1024)
        jobs += [(script, variant, checkpointing_args(script, model, files, os.path.join(folder, f"runs-{variant}")))
                 for script in SCRIPTS for variant in ("plain", "checkpointing")]

    def one(job):
        run = run_child(*job, cli.threads)
        if "peak_above_start_mb" in run:
            print(f"{run['script']:13s} {run['variant']:5s} peak per process {run['peak_above_start_mb']:6.0f} MB "
                  f"above its start ({run['start_mb']:.0f} MB), {run['seconds']:.0f} s", flush=True)
            return run
        print(f"{run['script']:13s} {run['variant']:13s} step {run['step_above_loaded_mb']:7.0f} MB, to the first "
              f"optimiser step {run['backward_above_loaded_mb']:7.0f} MB"
              + (f", entropy call {run['entropy_call_mb']:6.0f} MB" if "entropy_call_mb" in run else "")
              + f" above loaded ({run['loaded_mb']:.0f} MB); process peak {run['process_peak_mb']:.0f} MB, {run['seconds']:.0f} s",
              flush=True)
        return run

    with ThreadPoolExecutor(cli.jobs) as pool:
        results["runs"] = list(pool.map(one, jobs))
    by = {(r["script"], r["variant"]): r for r in results["runs"]}
    for script in SCRIPTS:
        if (script, "plain") in by:
            plain, checkpointed = by[script, "plain"], by[script, "checkpointing"]
            ratios = {k: checkpointed[k] / plain[k] for k in ("step_above_loaded_mb", "backward_above_loaded_mb")}
            results.setdefault("checkpointing_over_plain", {})[script] = ratios
            print(f"{script:13s} checkpointing / plain: step {ratios['step_above_loaded_mb']:.2f}, "
                  f"to the first optimiser step {ratios['backward_above_loaded_mb']:.2f}")
    if ("grpo", "full") in by:
        full = by["grpo", "full"]["peak_above_start_mb"]
        results["sharding_over_full"] = {v: by["grpo", v]["peak_above_start_mb"] / full for v in ("lora", "fsdp")}
        print("per process, over full fine-tuning: " + ", ".join(
            f"{v} {r:.2f}" for v, r in results["sharding_over_full"].items()))
    results["total_s"] = time.perf_counter() - t0
    print(f"total {results['total_s']:.0f} s")
    os.makedirs(os.path.dirname(cli.out), exist_ok=True)
    with open(cli.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
