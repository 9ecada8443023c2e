"""What fits where: the memory per GPU of the six scripts with Qwen2.5 0.5B, 1.5B, 7B and 32B, in GiB
(2^30 bytes), before activations, logits and the generation KV cache (they grow with the per-rank batch),
against one 80 GB GPU: 80e9 bytes = 74.5 GiB. Pure arithmetic; P = the model's parameters, k = 8 GPUs.

Per copy of the model, bytes per parameter (tests/bench/README.md, "Memory per GPU"):
  trained (policy, reward or value model): fp32 weights 4 + fp32 grads 4 + Adam m and v 8 = 16 in one process,
  + DDP's fp32 gradient buckets 4 = 20 with DDP; the reference: an fp32 copy of the policy, 4; a frozen reward
  model (ppo_rlhf.py --reward-model): bf16, 2. A value or reward model is counted at the policy's size.
  sft.py, reward_model.py: 1 trained; dpo.py, grpo.py, reinforce.py: 1 trained + the reference (dpo.py
  --precompute-ref-logps and grpo.py / reinforce.py --beta 0 drop it); ppo_rlhf.py: 2 trained (policy, value)
  + the reference, + 1 frozen bf16 with --reward-model.
Setups:
  1 GPU          python SCRIPT: 16 P per trained model (no DDP buckets in one process).
  8 GPUs DDP     torchrun --nproc_per_node 8 SCRIPT: DDP replicates, so every GPU holds 20 P per trained
                 model.
  8 GPUs FSDP2   torchrun --nproc_per_node 8 SCRIPT --fsdp: the trained models' fp32 weights, grads and Adam
                 state are sharded, 16/k bytes per parameter, and so is the fp32 reference, 4/k; plus one
                 decoder layer gathered in bf16 at a time, 2 bytes x its parameters, x2 for the prefetch of
                 the next. The frozen bf16 reward model is not sharded: 2 P on every GPU.
  LoRA, 1 GPU    python SCRIPT --lora-rank 16, on every linear of the decoder (q, k, v, o, gate, up, down):
                 the base frozen in bf16, 2 P; the adapter trained in fp32, r x (in + out) parameters per
                 linear at 16 bytes; no reference copy (the reference is the base, adapter off).
                 reward_model.py and ppo_rlhf.py's value model also train a scalar head (hidden_size
                 parameters, 16 bytes). ppo_rlhf.py: the policy's base + the value model's own base + both
                 adapters, + the reward model's 2 P with --reward-model.
  LoRA, 8 DDP    torchrun --nproc_per_node 8 SCRIPT --lora-rank 16: LoRA, 1 GPU + DDP's fp32 buckets for the
                 trained parameters (adapters and heads), 4 bytes each.
LoRA and FSDP2 are not combined in this project (no column). Not counted: autocast's bf16 weight copies, and
under FSDP2 the root unit's gathered embeddings and lm_head (2 x vocab x hidden bytes each) and a layer's
unsharded gradients before their reduce-scatter; nor host memory: under --fsdp each process loads the fp32
model (and copies it for the reference) in host memory, 8 bytes per parameter, before sharding to its GPU.
--compact names "1 GPU" and "LoRA" where 8-GPU DDP fits too.

    python tests/bench/fit.py              # the full table; writes tests/bench/results/fit.json
    python tests/bench/fit.py --compact    # per method and size, the setups that fit (for README.md)
"""
import argparse
import json
import os

GIB = 2 ** 30
CAPACITY = 80e9  # bytes: one 80 GB GPU, 74.5 GiB
K = 8  # GPUs for DDP and FSDP2
RANK = 16  # --lora-rank

# Qwen2.5-*-Instruct config.json: parameters, hidden, intermediate, layers, heads, kv heads, head dim,
# vocab_size (the embedding's rows: 151,936 tokens, padded to 152,064 in 7B and 32B), tied embeddings
MODELS = {
    "0.5B": (494_032_768, 896, 4864, 24, 14, 2, 64, 151_936, True),
    "1.5B": (1_543_714_304, 1536, 8960, 28, 12, 2, 128, 151_936, True),
    "7B": (7_615_616_512, 3584, 18944, 28, 28, 4, 128, 152_064, False),
    "32B": (32_763_876_352, 5120, 27648, 64, 40, 8, 128, 152_064, False),
}
# method: (trained models, fp32 reference, frozen bf16 reward model, trained scalar heads under LoRA)
METHODS = {
    "sft.py": (1, 0, 0, 0),
    "reward_model.py": (1, 0, 0, 1),
    "dpo.py": (1, 1, 0, 0),
    "grpo.py": (1, 1, 0, 0),
    "reinforce.py": (1, 1, 0, 0),
    "ppo_rlhf.py (judge)": (2, 1, 0, 1),
    "ppo_rlhf.py --reward-model": (2, 1, 1, 1),
}
SETUPS = ["1 GPU", "8 GPUs DDP", "8 GPUs FSDP2", "LoRA, 1 GPU", "LoRA, 8 GPUs DDP"]


def sizes(name):
    """P, one decoder layer's parameters, one model's LoRA adapter parameters, hidden size."""
    P, h, inter, layers, heads, kv, hd, vocab, tied = MODELS[name]
    # (in, out) of the seven linears of a decoder layer: q, k, v, o, gate, up, down
    linears = [(h, heads * hd), (h, kv * hd), (h, kv * hd), (heads * hd, h),
               (h, inter), (h, inter), (inter, h)]
    layer = sum(i * o for i, o in linears) + (heads + 2 * kv) * hd + 2 * h  # + q, k, v biases, 2 RMSNorms
    assert layers * layer + vocab * h * (1 if tied else 2) + h == P, name  # + embeddings, lm_head, final norm
    adapter = layers * sum(RANK * (i + o) for i, o in linears)
    return P, layer, adapter, h


def per_gpu(method, model):
    """Bytes per GPU under each setup."""
    trained, ref, rm, heads = METHODS[method]
    P, layer, adapter, h = sizes(model)
    frozen = 2 * rm * P  # the bf16 reward model, never sharded
    lora_trained = trained * adapter + heads * h
    lora = 2 * trained * P + 16 * lora_trained + frozen
    return {
        "1 GPU": 16 * trained * P + 4 * ref * P + frozen,
        "8 GPUs DDP": 20 * trained * P + 4 * ref * P + frozen,
        "8 GPUs FSDP2": (16 * trained * P + 4 * ref * P) / K + 2 * 2 * layer + frozen,
        "LoRA, 1 GPU": lora,
        "LoRA, 8 GPUs DDP": lora + 4 * lora_trained,
    }


def cell(nbytes):
    return f"{nbytes / GIB:.1f}" + ("" if nbytes <= CAPACITY else " ✗")


def compact(b):
    """The setups that fit, abbreviated; a setup's 8-GPU DDP variant is named only where it alone fails."""
    fits = {s: b[s] <= CAPACITY for s in SETUPS}
    parts = []
    for one, ddp, label in [("1 GPU", "8 GPUs DDP", "1 GPU"), ("8 GPUs FSDP2", None, "FSDP2"),
                            ("LoRA, 1 GPU", "LoRA, 8 GPUs DDP", "LoRA")]:
        if fits[one]:
            parts.append(label if ddp is None or fits[ddp] else f"{label} (not 8-GPU DDP)")
    return " · ".join(parts) or "—"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--compact", action="store_true", help="the setups that fit, per method and size")
    args = parser.parse_args()
    table = {m: {s: per_gpu(m, s) for s in MODELS} for m in METHODS}
    if args.compact:
        print("| method | " + " | ".join(MODELS) + " |")
        print("|---|" + "---|" * len(MODELS))
        for m, row in table.items():
            print(f"| {m} | " + " | ".join(compact(row[s]) for s in MODELS) + " |")
        return
    print(f"GiB per GPU before activations, logits and KV cache; ✗: over one 80 GB GPU "
          f"({CAPACITY / GIB:.1f} GiB)")
    print()
    print("| method | model | " + " | ".join(SETUPS) + " |")
    print("|---|---|" + "---:|" * len(SETUPS))
    for m, row in table.items():
        for s, b in row.items():
            print(f"| {m} | {s} | " + " | ".join(cell(b[x]) for x in SETUPS) + " |")
    out = {
        "capacity_bytes": CAPACITY, "capacity_gib": CAPACITY / GIB, "gpus": K, "lora_rank": RANK,
        "models": {s: dict(zip(["params", "decoder_layer_params", "lora_adapter_params", "hidden"], sizes(s)))
                   for s in MODELS},
        "per_gpu": {m: {s: {x: {"gib": round(b[x] / GIB, 2), "fits": b[x] <= CAPACITY} for x in SETUPS}
                        for s, b in row.items()} for m, row in table.items()},
    }
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "fit.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"\nwrote {os.path.relpath(path)}")


if __name__ == "__main__":
    main()
