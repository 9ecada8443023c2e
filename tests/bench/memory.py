"""Peak memory of one GRPO step with a 151,936-token vocabulary (Qwen2.5's), before and after log-probs in blocks.

"before" is grpo.py with the log-probs and entropy as they were: log_softmax over the whole (N, T, V) in fp32,
kept for backward. "after" is grpo.py as it is: a block of rows at a time, recomputed in backward. Both run one
step (with the logging-step entropy) in a fresh process, on a random-init Llama with a small hidden size, so
that the logits dominate as they do for a 0.5B model with long completions; fp32 and bf16 autocast.

    python tests/bench/memory.py                        # ~3 min on 2 CPU cores
    python tests/bench/memory.py --max-new-tokens 64    # larger
Writes tests/bench/results/memory.json. Peak = the process's peak resident set (ru_maxrss), so it includes the
interpreter, torch and the judge (about the same in every run); the table also gives the peak above the run's
resident set just before the step.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [ROOT, os.path.dirname(HERE)]


def old_token_logprobs(logits, tokens, temperature):
    """grpo.py before: the whole (N, T, V) in fp32 at once."""
    import torch
    return torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def old_entropy(logits, temperature):
    import torch
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def child(cli) -> None:
    """One GRPO step in this process; prints peak RSS (MB) as JSON."""
    import torch
    import grpo
    torch.set_num_threads(cli.threads)
    if cli.variant == "before":
        grpo.token_logprobs, grpo.entropy = old_token_logprobs, old_entropy
    before_step = {}
    sample = grpo.sample

    def sample_and_record(*a, **k):  # the resident set once the models are loaded and the eval has run
        before_step.setdefault("mb", rss_mb())
        return sample(*a, **k)
    grpo.sample = sample_and_record
    args = grpo.Args(model=cli.model, dtype=cli.dtype, total_steps=1, batch_size=cli.batch_size, group_size=cli.group_size,
                     micro_batch_size=cli.batch_size * cli.group_size, max_new_tokens=cli.max_new_tokens, eval_size=2,
                     eval_every=10, log_every=1, judge="correct", output_dir=tempfile.mkdtemp())
    t0 = time.perf_counter()
    grpo.main(args)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_mb": peak, "before_step_mb": before_step["mb"], "seconds": time.perf_counter() - t0}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=151_936, help="vocabulary size (Qwen2.5: 151,936)")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", dest="variant", choices=["before", "after"])
    parser.add_argument("--model")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "memory.json"))
    cli = parser.parse_args()
    if cli.variant:
        return child(cli)

    from local_models import chatml_tokenizer, save_random_model
    folder = tempfile.mkdtemp()
    tokenizer = chatml_tokenizer(vocab_size=cli.vocab)
    # no EOS in the sampler's reach to speak of: every completion runs to max_new_tokens, T is fixed
    model = save_random_model(os.path.join(folder, "model"), tokenizer, hidden=cli.hidden, layers=2, heads=2,
                              intermediate=2 * cli.hidden, context=256)
    N, T = cli.batch_size * cli.group_size, cli.max_new_tokens
    results = {"vocab": cli.vocab, "hidden": cli.hidden, "sequences": N, "completion_tokens": T,
               "fp32_logits_copy_mb": N * T * cli.vocab * 4 / 2**20, "runs": []}
    for dtype in ("float32", "bfloat16"):
        for variant in ("before", "after"):
            command = [sys.executable, __file__, "--child", variant, "--model", model, "--dtype", dtype,
                       "--batch-size", str(cli.batch_size), "--group-size", str(cli.group_size),
                       "--max-new-tokens", str(T), "--threads", str(cli.threads)]
            done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
            if done.returncode:
                sys.exit(done.stderr[-3000:])
            run = {"dtype": dtype, "variant": variant, **json.loads(done.stdout.strip().splitlines()[-1])}
            results["runs"].append(run)
            print(f"{dtype:9s} {variant:6s} peak {run['peak_mb']:7.0f} MB, {run['peak_mb'] - run['before_step_mb']:7.0f} MB "
                  f"above the loaded process, {run['seconds']:.0f} s", flush=True)
    for dtype in ("float32", "bfloat16"):
        before, after = (next(r for r in results["runs"] if r["dtype"] == dtype and r["variant"] == v) for v in ("before", "after"))
        results[f"{dtype}_peak_ratio_after_over_before"] = after["peak_mb"] / before["peak_mb"]
        print(f"{dtype}: peak after / before = {after['peak_mb'] / before['peak_mb']:.2f} "
              f"(one fp32 copy of the completion logits is {results['fp32_logits_copy_mb']:.0f} MB)")
    os.makedirs(os.path.dirname(cli.out), exist_ok=True)
    with open(cli.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
