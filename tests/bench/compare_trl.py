"""Our scripts against the matching TRL trainers: same model, data, judge, shapes and optimiser, on CPU.

    python3 -m venv /tmp/trl-venv && /tmp/trl-venv/bin/pip install -r tests/bench/requirements.txt
    python3 -m venv /tmp/trl112-venv && /tmp/trl112-venv/bin/pip install -r tests/bench/requirements-ppo.txt
    OMP_NUM_THREADS=1 /tmp/trl-venv/bin/python tests/bench/compare_trl.py --threads 1            # all six
    OMP_NUM_THREADS=1 /tmp/trl-venv/bin/python tests/bench/compare_trl.py grpo --trl-set learning_rate=1e-4  # refuses
    OMP_NUM_THREADS=1 /tmp/trl-venv/bin/python tests/bench/compare_trl.py --profile              # where our time goes
    OMP_NUM_THREADS=1 /tmp/trl-venv/bin/python tests/bench/compare_trl.py --scaling --steps 10 --rounds 1  # cost vs G, batch

For each method, one canonical settings dict (SETTINGS) is the single source: plan_<method>() maps it to our
CLI flags and to the TRL config. Each run is a fresh subprocess, interleaved ours, TRL, ours, TRL (--rounds).
After the first pair the effective settings are read back from both sides (our run's args.json plus the
constants fixed in our file; TRL's config object after the trainer was built, plus what trl_runner.py read
from the trainer) and compared with each other and with SETTINGS: any difference stops the benchmark with
the differing fields and exit code 2, before anything is reported. Then: per-step wall and CPU time (medians,
first --skip steps dropped), ours/TRL, time from process start to the first step, peak RSS (VmHWM; os.wait4's
ru_maxrss is kept too), and the reward of both final models evaluated here with the same function
(common.task.evaluate, or held-out pair agreement for reward models).
Results: tests/bench/results/trl_<method>.json.
TRL sources this relies on (trl 1.16.0 / 1.12.0 wheels): trl/trainer/{grpo,rloo,dpo,reward,sft}_{config,trainer}.py,
trl/trainer/base_config.py (bf16 and gradient_checkpointing defaults), trl/experimental/ppo/ppo_trainer.py.
"""
import argparse
import dataclasses
import glob
import importlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
PAINTER = os.path.join(ROOT, "common", "painter")

# ---- the canonical settings: one dict per method; each key is a named choice both sides must make ----------------
OPTIM = dict(optimizer="AdamW", adam_betas=[0.9, 0.999], adam_eps=1e-8, weight_decay=0.0, max_grad_norm=1.0,
             lr_schedule="constant", warmup_steps=0, dtype="float32", dropout=0.0, gradient_checkpointing=False)
RL = dict(batch_prompts=8, num_generations=8, max_completion_length=16, temperature=1.0, top_k=0, top_p=1.0,
          num_iterations=1, mask_truncated=False, micro_batch=64, judge="poet+correct", steps=40)
SETTINGS = {
    # SFT on real colour names (prompt, " name"), completion-only loss with EOS, sum / tokens of the batch
    "sft": {**OPTIM, "batch_size": 32, "steps": 40, "learning_rate": 5e-4, "weight_decay": 0.1,
            "weight_decay_on": "matrices", "adam_betas": [0.9, 0.95], "loss": "completion+EOS, token-mean",
            "max_length": 64, "packing": False, "eval_judge": "correct"},
    # Bradley-Terry RM, centering 0.01, head N(0, 1/sqrt(d+1)), 2560 poet-ranked pairs, one epoch; 64 pairs per
    # step, reward_model.py's default (--scaling measures 4 to 64)
    "rm": {**OPTIM, "batch_size": 64, "steps": 40, "learning_rate": 1e-3, "lr_schedule": "linear", "margin": 0.0,
           "center_coef": 0.01, "head_init_std": round(1 / np.sqrt(129), 6), "max_length": 64},
    # DPO sigmoid, beta 0.1, reference = frozen copy, computed per batch
    "dpo": {**OPTIM, "batch_size": 16, "steps": 40, "learning_rate": 5e-4, "lr_schedule": "linear", "beta": 0.1,
            "loss_type": "sigmoid", "label_smoothing": 0.0, "rpo_alpha": 0.0, "precompute_ref": False,
            "max_length": 64, "eval_judge": "poet"},
    # GRPO as in the paper: group-std advantages, seq-mean aggregation, k3 KL in the loss (no IS correction)
    "grpo": {**OPTIM, **RL, "learning_rate": 2e-4, "scale_rewards": "group", "loss_agg": "seq-mean", "beta": 0.04,
             "kl_estimator": "k3", "kl_is_correction": False, "epsilon_low": 0.2, "epsilon_high": 0.2},
    # RLOO: leave-one-out baseline, k1 KL summed over the sequence in the reward, sequence-level loss
    "rloo": {**OPTIM, **RL, "learning_rate": 2e-4, "baseline": "rloo", "beta": 0.05, "kl": "k1 in reward (seq sum)",
             "normalize_advantages": False, "loss": "-A * sum_t log pi, mean over sequences"},
    # PPO-RLHF with the reward model trained by our reward_model.py (the value model starts from it)
    "ppo": {**OPTIM, "batch_size": 16, "num_minibatches": 2, "num_ppo_epochs": 4, "steps": 40,
            "max_completion_length": 16, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "learning_rate": 2e-4,
            "lr_schedule": "linear", "adam_eps": 1e-5, "max_grad_norm": None, "kl_coef": 0.05, "kl_estimator": "k1",
            "gamma": 1.0, "lam": 0.95, "cliprange": 0.2, "cliprange_value": 0.2, "vf_coef": 0.1,
            "whiten_rewards": False, "truncated": "none", "stop": "eos"},
}
# implementation details that have no setting on one side: reported, not matched
SHARED = "each prompt runs once for its {} (its keys and values copied), TRL runs it once per {} (same log-probs and gradient)"
SAMPLER = ("sampler: ours a loop of its own (inverse-CDF draws, the prompt prefilled once per group), TRL's model.generate "
           "(torch.multinomial): the same distribution, other draws")
UNMATCHED = {
    "sft": ["data order: each side shuffles with its own RNG (same seed, different generators)",
            "the lm head: ours only where a completion token is predicted (logits_to_keep), TRL on every position"],
    "rm": ["data order (own RNG each side)", SHARED.format("chosen and rejected", "sequence"),
           "TRL reads the score at the last non-pad token via pad_token_id, ours from the attention mask (same token here: pad != EOS)"],
    "dpo": ["data order (own RNG each side)", SHARED.format("chosen and rejected", "sequence")],
    "grpo": ["prompt order and sampling (own RNG each side)", SAMPLER, SHARED.format("group", "completion")],
    "rloo": ["prompt order and sampling (own RNG each side)", SAMPLER, SHARED.format("group", "completion"),
             "TRL computes a ratio exp(sum logp - old) and clips it at 1 +- epsilon; with one iteration the ratio is 1 and "
             "the gradient equals reinforce.py's (which has no ratio)"],
    "ppo": ["score position: TRL adds the RM score at the first pad AFTER EOS (padding_mask_p1), ours on EOS "
            "(ppo_rlhf.py docstring, TRL #1893); no setting on either side",
            "TRL 1.12 PPO never clips the gradient norm (no clip_grad_norm_ in its loop): ours gets --max-grad-norm inf",
            "temperature: TRL divides by T + 1e-7", SAMPLER,
            "optimiser: TRL's fused AdamW, ours fused Adam (equal with weight decay 0)"],
}


def trl_optim(c: dict, f: dict) -> dict:
    """The optimiser/numerics part of a TRL config (TrainingArguments fields) in canonical names."""
    return dict(optimizer="AdamW" if str(c["optim"]).startswith("adamw_torch") else c["optim"],
                adam_betas=[c["adam_beta1"], c["adam_beta2"]], adam_eps=c["adam_epsilon"], weight_decay=c["weight_decay"],
                max_grad_norm=c["max_grad_norm"], lr_schedule=c["lr_scheduler_type"], warmup_steps=c["warmup_steps"],
                learning_rate=c["learning_rate"], dtype="mixed" if c["bf16"] or c["fp16"] else f["dtype"],
                dropout=f["dropout"], gradient_checkpointing=c["gradient_checkpointing"] or f["gradient_checkpointing"])


def ours_optim(a: dict, **fixed) -> dict:
    """Ours: flags from args.json, and the constants written in the file (passed as fixed=...)."""
    base = dict(optimizer="AdamW", adam_betas=[0.9, 0.999], adam_eps=1e-8, weight_decay=0.0, lr_schedule="constant",
                warmup_steps=0, dtype={"auto": "float32"}.get(a["dtype"], a["dtype"]),  # auto = fp32 on CPU
                dropout=0.0, gradient_checkpointing=False,  # dropout off (common.models); no checkpointing
                learning_rate=a["learning_rate"], max_grad_norm=a.get("max_grad_norm"))
    return {**base, **fixed}


TRL_BASE = dict(bf16=False, gradient_checkpointing=False, logging_steps=1, lr_scheduler_type="constant", warmup_steps=0)


# ---- one function per method: shared settings -> our flags, TRL config, and the two read-backs -------------------
def plan_sft(s, d):
    flags = dict(model=PAINTER, data=d["sft"], batch_size=s["batch_size"], grad_accum_steps=1, total_steps=s["steps"],
                 learning_rate=s["learning_rate"], warmup_steps=s["warmup_steps"], min_lr_ratio=1.0,  # = constant lr
                 weight_decay=s["weight_decay"], max_grad_norm=s["max_grad_norm"], judge=s["eval_judge"])
    trl = dict(TRL_BASE, per_device_train_batch_size=s["batch_size"], gradient_accumulation_steps=1, max_steps=s["steps"],
               learning_rate=s["learning_rate"], weight_decay=s["weight_decay"], adam_beta1=s["adam_betas"][0],
               adam_beta2=s["adam_betas"][1], max_grad_norm=s["max_grad_norm"], completion_only_loss=True,
               loss_type="nll", max_length=s["max_length"], packing=False)
    ours = lambda a: {**ours_optim(a, adam_betas=[0.9, 0.95], weight_decay=a["weight_decay"],  # sft.py AdamW betas
                                   lr_schedule="constant" if a["min_lr_ratio"] == 1.0 else "cosine", warmup_steps=a["warmup_steps"]),
                      "batch_size": a["batch_size"], "weight_decay_on": "matrices",  # p.dim() >= 2
                      "loss": "completion+EOS, token-mean", "max_length": 64, "packing": False, "eval_judge": a["judge"]}
    theirs = lambda c, f: {**trl_optim(c, f), "batch_size": c["per_device_train_batch_size"] * c["gradient_accumulation_steps"],
                           "weight_decay_on": "matrices" if f["decay_matrices_only"] else "other",
                           "loss": "completion+EOS, token-mean" if c["completion_only_loss"] and c["loss_type"] == "nll" else c["loss_type"],
                           "max_length": c["max_length"], "packing": c["packing"], "eval_judge": s["eval_judge"]}
    return "sft.py", flags, trl, ours, theirs


def plan_rm(s, d):
    flags = dict(data=d["pairs"], eval_data=d["heldout"], batch_size=s["batch_size"], num_epochs=1, learning_rate=s["learning_rate"],
                 weight_decay=s["weight_decay"], max_grad_norm=s["max_grad_norm"], margin=s["margin"], center_coef=s["center_coef"])
    trl = dict(TRL_BASE, per_device_train_batch_size=s["batch_size"], max_steps=s["steps"], learning_rate=s["learning_rate"],
               lr_scheduler_type=s["lr_schedule"], weight_decay=s["weight_decay"], max_grad_norm=s["max_grad_norm"],
               center_rewards_coefficient=s["center_coef"], max_length=s["max_length"], disable_dropout=True)
    ours = lambda a: {**ours_optim(a, lr_schedule="linear", weight_decay=a["weight_decay"]), "batch_size": a["batch_size"],
                      "margin": a["margin"],
                      "center_coef": a["center_coef"], "head_init_std": s["head_init_std"], "max_length": 64}  # N(0,1/sqrt(d+1)) in reward_model.py
    theirs = lambda c, f: {**trl_optim(c, f), "batch_size": c["per_device_train_batch_size"] * c["gradient_accumulation_steps"],
                           "margin": 0.0,  # TRL: margin only from a "margin" column; the data has none
                           "center_coef": c["center_rewards_coefficient"], "head_init_std": f["head_init_std"], "max_length": c["max_length"]}
    return "reward_model.py", flags, trl, ours, theirs


def plan_dpo(s, d):
    flags = dict(data=d["pairs"], eval_data=d["heldout"], batch_size=s["batch_size"], num_epochs=1, learning_rate=s["learning_rate"],
                 warmup_steps=s["warmup_steps"], max_grad_norm=s["max_grad_norm"], beta=s["beta"], loss_type=s["loss_type"],
                 label_smoothing=s["label_smoothing"], rpo_alpha=s["rpo_alpha"], judge=s["eval_judge"])
    trl = dict(TRL_BASE, per_device_train_batch_size=s["batch_size"], max_steps=s["steps"], learning_rate=s["learning_rate"],
               lr_scheduler_type=s["lr_schedule"], max_grad_norm=s["max_grad_norm"], beta=s["beta"], loss_type=[s["loss_type"]],
               label_smoothing=s["label_smoothing"], precompute_ref_log_probs=s["precompute_ref"], max_length=s["max_length"],
               disable_dropout=True)
    ours = lambda a: {**ours_optim(a, lr_schedule="linear", warmup_steps=a["warmup_steps"]), "batch_size": a["batch_size"],
                      "beta": a["beta"], "loss_type": a["loss_type"],
                      "label_smoothing": a["label_smoothing"], "rpo_alpha": a["rpo_alpha"],
                      "precompute_ref": a["precompute_ref_logps"], "max_length": 64, "eval_judge": a["judge"]}
    theirs = lambda c, f: {**trl_optim(c, f), "batch_size": c["per_device_train_batch_size"] * c["gradient_accumulation_steps"],
                           "beta": c["beta"], "loss_type": "+".join(c["loss_type"]),
                           "label_smoothing": c["label_smoothing"], "rpo_alpha": 0.0 if c["loss_weights"] is None else c["loss_weights"],
                           "precompute_ref": c["precompute_ref_log_probs"], "max_length": c["max_length"], "eval_judge": s["eval_judge"]}
    return "dpo.py", flags, trl, ours, theirs


def rl_flags(s, d):
    return dict(prompts=d["prompts"], judge=s["judge"], group_size=s["num_generations"], batch_size=s["batch_prompts"],
                micro_batch_size=s["micro_batch"], max_new_tokens=s["max_completion_length"], temperature=s["temperature"],
                total_steps=s["steps"], learning_rate=s["learning_rate"], max_grad_norm=s["max_grad_norm"], beta=s["beta"],
                mask_truncated=s["mask_truncated"])


def rl_trl(s):
    n = s["batch_prompts"] * s["num_generations"]  # TRL's batch counts completions, not prompts
    return dict(TRL_BASE, per_device_train_batch_size=n, gradient_accumulation_steps=1, num_generations=s["num_generations"],
                max_completion_length=s["max_completion_length"], temperature=s["temperature"], top_k=s["top_k"], top_p=s["top_p"],
                max_steps=s["steps"], learning_rate=s["learning_rate"], max_grad_norm=s["max_grad_norm"], beta=s["beta"],
                num_iterations=s["num_iterations"], mask_truncated_completions=s["mask_truncated"], disable_dropout=True)


def rl_ours(a):
    return {**ours_optim(a), "batch_prompts": a["batch_size"], "num_generations": a["group_size"],
            "max_completion_length": a["max_new_tokens"], "temperature": a["temperature"],
            "top_k": 0, "top_p": 1.0,  # common.models.sample: softmax(logits / T) only
            "mask_truncated": a["mask_truncated"], "micro_batch": a["micro_batch_size"], "judge": a["judge"],
            "beta": a["beta"]}


def rl_theirs(c, f):
    return {**trl_optim(c, f), "batch_prompts": c["generation_batch_size"] // c["num_generations"],
            "num_generations": c["num_generations"], "max_completion_length": c["max_completion_length"],
            "temperature": c["temperature"], "top_k": c["top_k"], "top_p": c["top_p"],
            # one optimiser step per generated batch only when steps_per_generation == gradient_accumulation_steps
            "num_iterations": c["num_iterations"] * c["steps_per_generation"] // c["gradient_accumulation_steps"],
            "mask_truncated": c["mask_truncated_completions"], "micro_batch": c["per_device_train_batch_size"],
            "judge": f["judge"], "beta": c["beta"]}


def plan_grpo(s, d):
    flags = dict(rl_flags(s, d), scale_rewards=s["scale_rewards"], loss_agg=s["loss_agg"], kl_estimator=s["kl_estimator"],
                 clip_eps_low=s["epsilon_low"], clip_eps_high=s["epsilon_high"], num_iterations=s["num_iterations"])
    trl = dict(rl_trl(s), scale_rewards=s["scale_rewards"], epsilon=s["epsilon_low"], epsilon_high=s["epsilon_high"],
               loss_type={"seq-mean": "grpo", "token-mean": "dapo", "constant": "dr_grpo"}[s["loss_agg"]],
               use_bias_correction_kl=s["kl_is_correction"])  # TRL 1.16 default True: k3 * ratio (DeepSeek-V3.2)
    ours = lambda a: {**rl_ours(a), "num_iterations": a["num_iterations"], "scale_rewards": a["scale_rewards"],
                      "loss_agg": a["loss_agg"], "kl_estimator": a["kl_estimator"], "kl_is_correction": False,  # grpo.py: plain k3
                      "epsilon_low": a["clip_eps_low"], "epsilon_high": a["clip_eps_high"]}
    theirs = lambda c, f: {**rl_theirs(c, f), "scale_rewards": c["scale_rewards"], "kl_estimator": "k3",  # GRPOTrainer: k3 only
                           "loss_agg": {"grpo": "seq-mean", "dapo": "token-mean", "dr_grpo": "constant"}.get(c["loss_type"], c["loss_type"]),
                           "kl_is_correction": c["use_bias_correction_kl"], "epsilon_low": c["epsilon"],
                           "epsilon_high": c["epsilon_high"] if c["epsilon_high"] is not None else c["epsilon"]}
    return "grpo.py", flags, trl, ours, theirs


def plan_rloo(s, d):
    flags = dict(rl_flags(s, d), baseline=s["baseline"])
    trl = dict(rl_trl(s), normalize_advantages=s["normalize_advantages"])
    ours = lambda a: {**rl_ours(a), "num_iterations": 1, "baseline": a["baseline"], "kl": "k1 in reward (seq sum)",  # reinforce.py
                      "normalize_advantages": False, "loss": "-A * sum_t log pi, mean over sequences"}
    theirs = lambda c, f: {**rl_theirs(c, f), "baseline": "rloo", "kl": "k1 in reward (seq sum)",  # RLOOTrainer: fixed
                           "normalize_advantages": c["normalize_advantages"], "loss": "-A * sum_t log pi, mean over sequences"}
    return "reinforce.py", flags, trl, ours, theirs


def plan_ppo(s, d):
    flags = dict(prompts=d["prompts"], reward_model=d["rm"], judge="poet", batch_size=s["batch_size"],
                 num_minibatches=s["num_minibatches"], num_ppo_epochs=s["num_ppo_epochs"], total_steps=s["steps"],
                 max_new_tokens=s["max_completion_length"], temperature=s["temperature"], learning_rate=s["learning_rate"],
                 max_grad_norm="inf", kl_coef=s["kl_coef"], gamma=s["gamma"], lam=s["lam"], clip_eps=s["cliprange"],
                 value_clip=s["cliprange_value"], vf_coef=s["vf_coef"], whiten_rewards=s["whiten_rewards"], truncated=s["truncated"])
    # TRL PPO: rollout = per_device_train_batch_size * gradient_accumulation_steps; one optimiser step per
    # micro-batch only with gradient_accumulation_steps = 1 (accelerate skips optimizer.step() otherwise)
    trl = dict(TRL_BASE, per_device_train_batch_size=s["batch_size"], gradient_accumulation_steps=1,
               num_mini_batches=s["num_minibatches"], num_ppo_epochs=s["num_ppo_epochs"], total_episodes=s["steps"] * s["batch_size"],
               response_length=s["max_completion_length"], temperature=s["temperature"], learning_rate=s["learning_rate"],
               lr_scheduler_type=s["lr_schedule"], adam_epsilon=s["adam_eps"], kl_coef=s["kl_coef"], kl_estimator=s["kl_estimator"],
               gamma=s["gamma"], lam=s["lam"], cliprange=s["cliprange"], cliprange_value=s["cliprange_value"], vf_coef=s["vf_coef"],
               whiten_rewards=s["whiten_rewards"], missing_eos_penalty=None, stop_token=s["stop"], num_sample_generations=0)
    ours = lambda a: {**ours_optim(a, lr_schedule="linear", adam_eps=1e-5),  # ppo_rlhf.py: Adam(eps=1e-5), linear to 0
                      "max_grad_norm": None if a["max_grad_norm"] == float("inf") else a["max_grad_norm"],
                      **{k: a[k] for k in ("batch_size", "num_minibatches", "num_ppo_epochs", "temperature", "kl_coef", "gamma",
                                           "lam", "vf_coef", "whiten_rewards", "truncated")},
                      "max_completion_length": a["max_new_tokens"], "top_k": 0, "top_p": 1.0,
                      "kl_estimator": "k1", "cliprange": a["clip_eps"], "cliprange_value": a["value_clip"], "stop": "eos"}
    theirs = lambda c, f: {**trl_optim(c, f), "max_grad_norm": None,  # never applied by PPOTrainer.train
                           "batch_size": c["batch_size"], "num_minibatches": c["num_mini_batches"] if c["gradient_accumulation_steps"] == 1 else None,
                           "num_ppo_epochs": c["num_ppo_epochs"], "max_completion_length": c["response_length"], "temperature": c["temperature"], "top_k": 0, "top_p": 1.0,
                           **{k: c[k] for k in ("kl_coef", "kl_estimator", "gamma", "lam", "cliprange", "cliprange_value", "vf_coef", "whiten_rewards")},
                           "truncated": "none" if c["missing_eos_penalty"] is None else "subtract",
                           "stop": "eos" if f["stop_is_eos"] else "other"}
    return "ppo_rlhf.py", flags, trl, ours, theirs


PLANS = {"sft": plan_sft, "rm": plan_rm, "dpo": plan_dpo, "grpo": plan_grpo, "rloo": plan_rloo, "ppo": plan_ppo}


# ---- data: written once, the same files go to both sides ----------------------------------------------------------
def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def build_data(out, n_sft, n_pairs):
    from common.colours import PROMPT, candidate_names, color_names, pair_prompts, rank_pairs
    from common.models import load_model_and_tokenizer
    from common.task import get_judge
    os.makedirs(out, exist_ok=True)
    d = {k: os.path.join(out, f"{k}.jsonl") for k in ("prompts", "sft", "pairs", "heldout")}
    def rows(path):  # -1 when missing
        if not os.path.exists(path):
            return -1
        with open(path) as f:
            return sum(1 for _ in f)
    if all(rows(d[k]) >= 0 for k in ("prompts", "heldout")) and rows(d["pairs"]) >= n_pairs and rows(d["sft"]) >= n_sft:
        return d  # written before, with enough rows for these settings
    # RL prompts: the training-split hexes, as grpo.py / reinforce.py / ppo_rlhf.py use by default
    write_jsonl(d["prompts"], [{"prompt": PROMPT.format(hex=h)} for h in sorted({h for _, h in color_names("train")})])
    model, tokenizer = load_model_and_tokenizer(PAINTER, "cpu")
    vocab = tokenizer.get_vocab()
    names = [(n, h) for n, h in color_names("train") if all(w in vocab for w in n.split())]  # no <unk> in targets
    rng = np.random.default_rng(0)
    # NOTE: the leading space: TRL tokenizes prompt + completion as one string; ours encodes them apart
    write_jsonl(d["sft"], [{"prompt": PROMPT.format(hex=names[i][1]), "completion": " " + names[i][0]}
                           for i in rng.choice(len(names), n_sft, replace=False)])
    judge = get_judge("poet", "cpu")  # pairs as dpo.py / reward_model.py build them: the painter's names, poet-ranked
    for key, split, n, seed in (("pairs", "train", int(n_pairs * 1.2), 1), ("heldout", "heldout", 256, 0)):
        prompts = pair_prompts(n, split, seed)
        pairs = rank_pairs(prompts, candidate_names(prompts, 4, "policy", seed, model, tokenizer), judge, 0.0, seed)
        pairs = [{"prompt": p["prompt"], "chosen": " " + p["chosen"], "rejected": " " + p["rejected"]} for p in pairs]
        write_jsonl(d[key], pairs[:n_pairs] if key == "pairs" else pairs)
    return d


def our_tokens(method, data, tokenizer):
    """The token ids our script builds for the first data row, in the layout trl_runner.py reports TRL's."""
    from common.models import encode_completion, encode_prompt
    row = json.loads(open(data).readline())
    p = encode_prompt(tokenizer, row["prompt"])
    if method == "sft":
        c = encode_completion(tokenizer, row["prompt"], row["completion"])
        return {"input_ids": p + c, "labels": [-100] * len(p) + c}  # sft.py's completion mask, as TRL's labels
    c, r = (encode_completion(tokenizer, row["prompt"], row[k]) for k in ("chosen", "rejected"))
    return {"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} if method == "dpo" else {"chosen_ids": p + c, "rejected_ids": p + r}


# ---- running one side -------------------------------------------------------------------------------------------
def cpu_seconds(pid):
    """CPU time (user + system, all threads) the process has used so far, from /proc (10 ms ticks)."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError):
        return float("nan")


def peak_rss_mb(pid):
    """VmHWM: the peak RSS of the process since its exec (a high-water mark, so any later read sees it)."""
    try:
        return next(int(l.split()[1]) for l in open(f"/proc/{pid}/status") if l.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return 0.0


def run_child(cmd, env, log_path):
    """Run cmd as a fresh process; stamp each stdout line with wall time and the child's CPU time so far (CPU
    time barely moves when other jobs share the cores, wall time does); peak RSS; exit status and rusage by os.wait4."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    t_spawn = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1)
        lines, hwm = [], 0.0
        for line in proc.stdout:
            lines.append((time.time(), line.rstrip("\n"), cpu_seconds(proc.pid)))
            hwm = max(hwm, peak_rss_mb(proc.pid))
            log.write(line)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd[:3])}... failed (exit {proc.returncode}); see {log_path}")
    # NOTE: Linux keeps ru_maxrss across fork + exec, so wait4's figure is at least this harness's own RSS at the
    # fork (~0.8 GB once it has loaded the judge); VmHWM, read at every stdout line, is the child's own peak
    return t_spawn, lines, {"peak_rss_mb": hwm, "ru_maxrss_mb": usage.ru_maxrss / 1024}


def child_env(threads):
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1",
            "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
            "TRL_EXPERIMENTAL_SILENCE": "1"}


def run_ours(script, flags, seed, out, threads, prefix=()):
    cmd = [sys.executable, *prefix, script] + [f"--{k.replace('_', '-')}" if v is True else f"--no-{k.replace('_', '-')}"
                                      if v is False else f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]
    cmd += [f"--seed={seed}", f"--output-dir={out}", "--log-every=1", "--eval-every=100000"]
    shutil.rmtree(out, ignore_errors=True)  # one run folder inside, found below
    t_spawn, lines, rss = run_child(cmd, child_env(threads), out + ".log")
    run_dir = os.path.dirname(glob.glob(os.path.join(out, "*", "args.json"))[0])
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    steps = [r for r in rows if "perf/step_s" in r]
    step_lines = [(t, cpu) for t, line, cpu in lines if line.startswith("step ") and "s/step" in line]
    # NOTE: our scripts evaluate the starting model before step 1 (TRL does not): startup leaves that eval out.
    # main() prints its changed flags first (t_main, just after imports); the step-0 eval starts perf/train_s later.
    t_main = next(t for t, line, _ in lines if line.split(" ", 1)[0].endswith(".py"))
    startup = t_main - t_spawn + next(r for r in rows if "perf/train_s" in r)["perf/train_s"]
    return dict(cmd=cmd, step_s=[r["perf/step_s"] for r in steps], interval_s=list(np.diff([t for t, _ in step_lines])),
                cpu_interval_s=list(np.diff([cpu for _, cpu in step_lines])), startup_s=startup,
                first_step_incl_eval0_s=step_lines[0][0] - steps[0]["perf/step_s"] - t_spawn,
                **rss, model=os.path.join(run_dir, "model"), args=json.load(open(os.path.join(run_dir, "args.json"))))


def run_trl(method, trl_cfg, data, seed, out, threads, python, judge=None, extra=None):
    os.makedirs(out, exist_ok=True)
    spec = dict(method=method, repo=ROOT, model=PAINTER, out=out, threads=threads, seed=seed, config=trl_cfg,
                judge=judge, **data, **(extra or {}))
    with open(os.path.join(out, "spec.json"), "w") as f:
        json.dump(spec, f)
    cmd = [python, os.path.join(ROOT, "tests", "bench", "trl_runner.py"), os.path.join(out, "spec.json")]
    t_spawn, _, rss = run_child(cmd, child_env(threads), out + ".log")
    r = json.load(open(os.path.join(out, "trl_run.json")))
    ends = np.array(r["step_end"])
    begins = np.array(r["step_begin"]) if r["step_begin"] else np.concatenate([[r["t_train_begin"]], ends[:-1]])
    return dict(cmd=cmd, step_s=list(ends - begins), interval_s=list(np.diff(ends)),
                cpu_interval_s=list(np.diff(r["cpu_step_end"])), startup_s=begins[0] - t_spawn,
                **rss, model=os.path.join(out, "model"), config=r["config"], facts=r["facts"], explicit=r["explicit"], trl_version=r["trl_version"])


# ---- read-back check and evaluation -------------------------------------------------------------------------------
def differing(settings, ours, theirs):
    norm = lambda v: [norm(x) for x in v] if isinstance(v, (list, tuple)) else (round(v, 10) if isinstance(v, float) else v)
    return [(k, settings.get(k), ours.get(k, "<missing>"), theirs.get(k, "<missing>")) for k in sorted(set(settings) | set(ours) | set(theirs))
            if not norm(settings.get(k)) == norm(ours.get(k, "<missing>")) == norm(theirs.get(k, "<missing>"))]


def evaluate_model(method, path, d, seeds):
    """The same eval for both final models: reward on common.colours.eval_prompts(64) (mean over the same
    sampling seeds), or held-out pair agreement for reward models (reward_model.evaluate_pairs)."""
    from common.colours import eval_prompts
    from common.models import load_model_and_tokenizer
    from common.task import encode_pairs, evaluate, get_judge, read_pairs
    if method == "rm":
        rm = importlib.import_module("reward_model")
        model, tok = load_model_and_tokenizer(path, "cpu", scalar_head=True)
        pairs = encode_pairs(tok, read_pairs(d["heldout"]), 64, warn=lambda *_: None)
        return {"eval/accuracy": rm.evaluate_pairs(model, pairs, tok.pad_token_id)["eval/accuracy"]}
    model, tok = load_model_and_tokenizer(path, "cpu")
    judges = {"sft": ["correct"], "dpo": ["poet"], "grpo": ["poet+correct"], "rloo": ["poet+correct"],
              "ppo": [f"rm:{d.get('rm')}", "poet"]}[method]
    result = {}
    rows = [{"prompt": p} for p in eval_prompts(64)]  # common.task.evaluate's rows
    for name in judges:
        runs = [evaluate(model, tok, get_judge(name, "cpu"), rows, 1.0, 16, seed=s)[0] for s in seeds]
        key = "eval/reward" if name == judges[0] else f"eval/{name}"
        result[key] = float(np.mean([m["eval/reward"] for m in runs]))
        result.setdefault("eval/correct", float(np.mean([m["eval/correct"] for m in runs])))
        result.setdefault("eval/distinct", float(np.mean([m["eval/distinct"] for m in runs])))
    return result


def trained_rm(out, d, threads):
    """PPO needs a reward model module on both sides: one trained by our reward_model.py on the benchmark pairs."""
    path = os.path.join(out, "rm_for_ppo")
    found = glob.glob(os.path.join(path, "*", "model", "config.json"))
    if not found:
        _, flags, *_ = plan_rm(SETTINGS["rm"], d)
        run_ours("reward_model.py", flags, 1, path, threads)
        found = glob.glob(os.path.join(path, "*", "model", "config.json"))
    return os.path.dirname(found[0])


def explicit(script, args_json):
    """Our flags that differ from the script's defaults (the settings we had to set on our side)."""
    defaults = dataclasses.asdict(importlib.import_module(script[:-3]).Args())
    skip = {"seed", "output_dir", "log_every", "eval_every", "data", "eval_data", "prompts", "reward_model", "model"}
    return {k: [defaults[k], v] for k, v in args_json.items() if k not in skip and defaults.get(k) != v}


def parse_sets(items):
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def summarise(runs, skip):
    """Per run: the median over steps (the first `skip` left out); over runs: the median (robust to a run
    that shared the cores with another job)."""
    per_run = lambda key: statistics.median(statistics.median(r[key][skip:]) for r in runs)
    return {"step_s_median": per_run("step_s"), "interval_s_median": per_run("interval_s"),
            "cpu_s_per_step_median": per_run("cpu_interval_s"), "startup_s": statistics.median(r["startup_s"] for r in runs),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "ru_maxrss_mb": max(r["ru_maxrss_mb"] for r in runs),
            **{k: statistics.mean(r["eval"][k] for r in runs) for k in runs[0]["eval"]}}


def bench(method, a, d, overrides=None, write=True):
    s = {**SETTINGS[method], **(overrides or {})}
    if a.steps:  # a quick run: the same settings with fewer steps (both sides get it)
        s = {**s, "steps": a.steps}
    out = os.path.join(a.out, method)
    extra = {}
    if method == "ppo":
        d = {**d, "rm": trained_rm(a.out, d, a.threads)}
        extra = {"reward_model": d["rm"]}
    # exactly steps * batch rows: one epoch with no partial batch on either side (dpo.py and reward_model.py count
    # steps as len(pairs) // batch_size per epoch; TRL runs max_steps)
    for key, m in (("pairs", ("rm", "dpo")), ("sft", ("sft",))):
        if method in m:
            os.makedirs(out, exist_ok=True)
            rows = open(d[key]).readlines()[: s["steps"] * s["batch_size"]]
            d = {**d, key: os.path.join(out, f"{key}.jsonl")}
            open(d[key], "w").writelines(rows)
    if method == "rm":
        extra = {"head_init_std": s["head_init_std"]}
    script, flags, trl_cfg, read_ours, read_trl = PLANS[method](s, d)
    flags.update(parse_sets(a.ours_set))
    trl_cfg.update(parse_sets(a.trl_set))
    python = a.ppo_python if method == "ppo" else sys.executable
    data = {k: d[k] for k in ("prompts", "sft", "pairs", "heldout") if k in d}
    data["data"] = {"sft": d["sft"], "rm": d["pairs"], "dpo": d["pairs"]}.get(method)
    ours_runs, trl_runs = [], []
    for round_ in range(a.rounds):
        seed = a.seed + round_
        print(f"[{method}] round {round_ + 1}/{a.rounds}: ours ({script})", flush=True)
        ours_runs.append(run_ours(script, flags, seed, os.path.join(out, f"r{round_}_ours"), a.threads))
        print(f"[{method}] round {round_ + 1}/{a.rounds}: TRL", flush=True)
        trl_runs.append(run_trl(method, trl_cfg, data, seed, os.path.join(out, f"r{round_}_trl"), a.threads, python,
                                s.get("judge"), extra))
        if round_ == 0:  # the read-back check, before anything is reported
            ours_rb, trl_rb = read_ours(ours_runs[0]["args"]), read_trl(trl_runs[0]["config"], trl_runs[0]["facts"])
            ours_rb["seed"], trl_rb["seed"] = ours_runs[0]["args"]["seed"], trl_runs[0]["config"]["seed"]
            # the steps each side really took (one logged row / one on_step_end per optimiser step)
            ours_rb["steps"], trl_rb["steps"] = len(ours_runs[0]["step_s"]), len(trl_runs[0]["step_s"])
            diffs = differing({**s, "seed": seed}, ours_rb, trl_rb)
            if method in ("sft", "rm", "dpo"):
                from common.models import load_model_and_tokenizer
                mine = our_tokens(method, data["data"], load_model_and_tokenizer(PAINTER, "cpu")[1])
                theirs = trl_runs[0]["facts"]["first_example_ids"]
                if mine != theirs:
                    diffs.append(("token ids of the first example", None, mine, theirs))
            if diffs:
                print(f"\nREFUSING to report {method}: the effective settings differ (field, canonical, ours, TRL):", file=sys.stderr)
                for row in diffs:
                    print("  " + " | ".join(map(str, row)), file=sys.stderr)
                sys.exit(2)
            print(f"[{method}] settings read back from both sides agree ({len(s)} fields)", flush=True)
    for r in ours_runs + trl_runs:
        r["eval"] = evaluate_model(method, r["model"], d, a.eval_seeds) if write else {}
    ours, theirs = summarise(ours_runs, a.skip), summarise(trl_runs, a.skip)
    result = {"method": method, "settings": s, "unmatched": UNMATCHED[method], "threads": a.threads,
              "rounds": a.rounds, "skip_first_steps": a.skip, "eval_seeds": a.eval_seeds,
              "ours": ours, "trl": theirs, "ratio_step_ours_over_trl": ours["step_s_median"] / theirs["step_s_median"],
              "speedup_trl_over_ours": theirs["step_s_median"] / ours["step_s_median"],
              "cpu_speedup_trl_over_ours": theirs["cpu_s_per_step_median"] / ours["cpu_s_per_step_median"],
              "set_explicitly": {"ours": explicit(script, ours_runs[0]["args"]), "trl": trl_runs[0]["explicit"]},
              "commands": {"ours": " ".join(ours_runs[0]["cmd"][1:]), "trl": trl_runs[0]["cmd"][-1]},
              "trl_version": trl_runs[0]["trl_version"], "machine": machine(),
              "runs": {"ours": [{k: v for k, v in r.items() if k not in ("args", "cmd")} for r in ours_runs],
                       "trl": [{k: v for k, v in r.items() if k not in ("config", "facts", "explicit", "cmd")} for r in trl_runs]}}
    if not write:
        return result
    os.makedirs(a.results, exist_ok=True)
    rounded = lambda x: ({k: rounded(v) for k, v in x.items()} if isinstance(x, dict) else [rounded(v) for v in x]
                         if isinstance(x, list) else float(f"{x:.4g}") if isinstance(x, float) else x)
    with open(os.path.join(a.results, f"trl_{method}.json"), "w") as f:
        json.dump(rounded(result), f, indent=1, default=lambda v: float(f"{float(v):.4g}"))
    return result


def profile(method, a, d):
    """Where our script's step time goes: cProfile over two runs with the benchmark's flags, of n/4 and n steps;
    the difference divided by the extra steps leaves out everything done once (imports, loading, the evals)."""
    import pstats
    if method == "ppo":
        d = {**d, "rm": trained_rm(a.out, d, a.threads)}
    totals = []
    for steps in (max(2, (a.steps or SETTINGS[method]["steps"]) // 4), a.steps or SETTINGS[method]["steps"]):
        script, flags, *_ = PLANS[method]({**SETTINGS[method], "steps": steps}, d)
        if method in ("rm", "dpo", "sft"):  # these count steps from the data: give them steps * batch rows
            key = "sft" if method == "sft" else "pairs"
            path = os.path.join(a.out, "profile", f"{method}_{steps}.jsonl")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            open(path, "w").writelines(open(d[key]).readlines()[: steps * SETTINGS[method]["batch_size"]])
            flags["data"] = path
        out = os.path.join(a.out, "profile", f"{method}_{steps}")
        run = run_ours(script, flags, a.seed, out, a.threads, prefix=["-m", "cProfile", "-o", out + ".prof"])
        stats = pstats.Stats(out + ".prof").stats
        def seconds(match_fn, match_caller=lambda c: True):
            return sum(ct for fn, (_, _, _, _, callers) in stats.items() if match_fn(fn)
                       for caller, (_, _, _, ct) in callers.items() if match_caller(caller))
        from_script = lambda c: c[0].endswith(script)
        # not the sampler's own forwards: the script's own forward functions and common.models' shared one
        forward_caller = lambda c: from_script(c) or c[2] == "forward_sharing_prompts"
        totals.append((steps, sum(run["step_s"]), {
            "sampling (common.sample)": seconds(lambda f: f[2] == "sample" and f[0].endswith(os.path.join("common", "models.py"))),
            "judge": seconds(lambda f: f[0].endswith(os.path.join("common", "judges.py")), from_script),
            "model forwards (outside sampling)": seconds(lambda f: f[2] == "_wrapped_call_impl", forward_caller),
            "backward": seconds(lambda f: f[2] == "backward" and f[0].endswith("_tensor.py")),
            "optimizer step": seconds(lambda f: f[2] == "wrapper" and f[0].endswith("optimizer.py"), from_script)}))
    (n1, t1, p1), (n2, t2, p2) = totals
    phases = {k: (p2[k] - p1[k]) / (n2 - n1) for k in p1}
    total = (t2 - t1) / (n2 - n1)
    parts = sum(phases.values())
    phases["rest (log-softmax, losses, masks, data, Python)"] = total - parts
    print(f"\n{script}: {total:.3f} s per step under cProfile; by phase (runs of {n2} minus {n1} steps):")
    for name, sec in phases.items():
        print(f"  {name:<48} {sec:.3f}  ({100 * sec / total:.0f}%)")
    print(f"  step / sum of the parts above the rest: {total / parts:.2f}")
    return {**phases, "total": total, "step_over_parts": total / parts}


SCALING = {"grpo": ("num_generations", [2, 4, 8, 16, 32]), "rloo": ("num_generations", [2, 4, 8, 16, 32]),
           "dpo": ("batch_size", [4, 8, 16, 32, 64]), "rm": ("batch_size", [4, 8, 16, 32, 64])}


def scaling(a, d):
    """Step time against the group size G (grpo, rloo) and the batch size (dpo, rm), ours and TRL's in the same
    run: one pair of runs per point (ours, then TRL), the same settings read back as in the benchmark."""
    results = {}
    for method in [m for m in a.methods if m in SCALING]:
        key, values = SCALING[method]
        for value in values:
            over = {key: value}
            if key == "num_generations":  # one micro-batch on both sides, as in the benchmark
                over["micro_batch"] = SETTINGS[method]["batch_prompts"] * value
            print(f"[scaling] {method} {key}={value}", flush=True)
            r = bench(method, a, d, overrides=over, write=False)
            results.setdefault(method, []).append({key: value, "ours_step_s": r["ours"]["step_s_median"],
                                                   "trl_step_s": r["trl"]["step_s_median"]})
            print(f"  ours {r['ours']['step_s_median']:.3f} s, TRL {r['trl']['step_s_median']:.3f} s per step", flush=True)
    with open(os.path.join(a.results, "scaling.json"), "w") as f:
        json.dump({"steps": a.steps, "rounds": a.rounds, "threads": a.threads, "machine": machine(), "results": results}, f, indent=1)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 3.4))
    for ax, (method, rows) in zip(np.atleast_1d(axes), results.items()):
        key = SCALING[method][0]
        x = [r[key] for r in rows]
        ax.plot(x, [r["ours_step_s"] for r in rows], "o-", label="ours")
        ax.plot(x, [r["trl_step_s"] for r in rows], "s--", label="TRL")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("G (completions per prompt)" if key == "num_generations" else "pairs per step")
        ax.set_ylabel("s per step")
        ax.set_title(f"{method}: TRL / ours = " + ", ".join(f"{r['trl_step_s'] / r['ours_step_s']:.1f}" for r in rows), fontsize=8)
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(a.results, "scaling.png"), dpi=120)
    return results


def machine():
    import torch
    import transformers
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("methods", nargs="*", default=list(PLANS), help=f"any of {', '.join(PLANS)} (default: all, in this order)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (OMP_NUM_THREADS and torch.set_num_threads)")
    p.add_argument("--rounds", type=int, default=3, help="pairs of runs, interleaved ours, TRL, ours, TRL, ...")
    p.add_argument("--steps", type=int, default=None, help="override the number of steps (quick checks)")
    p.add_argument("--skip", type=int, default=2, help="first steps left out of the per-step median")
    p.add_argument("--seed", type=int, default=1, help="seed of round 1 (round k uses seed + k - 1) on both sides")
    p.add_argument("--eval-seeds", type=int, nargs="+", default=[0, 1, 2, 3], help="sampling seeds of the final eval")
    p.add_argument("--trl-set", action="append", default=[], metavar="FIELD=VALUE", help="override a TRL config field")
    p.add_argument("--ours-set", action="append", default=[], metavar="FIELD=VALUE", help="override one of our flags")
    p.add_argument("--profile", action="store_true", help="instead: profile our script (cProfile) with the same flags")
    p.add_argument("--scaling", action="store_true", help="instead: step time against G (grpo, rloo) and batch size (dpo, rm)")
    p.add_argument("--out", default="/tmp/bench_trl", help="run folders, data and models")
    p.add_argument("--results", default=os.path.join(ROOT, "tests", "bench", "results"))
    p.add_argument("--ppo-python", default="/tmp/trl112-venv/bin/python", help="python of the trl 1.12 environment")
    a = p.parse_args()
    if set(a.methods) - set(PLANS):
        p.error(f"unknown method(s) {sorted(set(a.methods) - set(PLANS))}: choose from {', '.join(PLANS)}")
    os.environ["OMP_NUM_THREADS"] = str(a.threads)
    import torch
    torch.set_num_threads(a.threads)
    d = build_data(os.path.join(a.out, "data"), n_sft=max(SETTINGS["sft"]["steps"], a.steps or 0) * SETTINGS["sft"]["batch_size"],
                   n_pairs=max(SETTINGS["rm"]["steps"], a.steps or 0) * SETTINGS["rm"]["batch_size"])
    if a.profile:
        profiles = {method: profile(method, a, d) for method in a.methods}
        os.makedirs(a.results, exist_ok=True)
        with open(os.path.join(a.results, "profile.json"), "w") as f:
            json.dump({"steps": a.steps, "threads": a.threads, "machine": machine(), "profiles": profiles}, f, indent=1)
        return
    if a.scaling:
        scaling(a, d)
        return
    rows = []
    for method in a.methods:
        r = bench(method, a, d)
        o, t = r["ours"], r["trl"]
        rows.append(f"| {method} | {o['step_s_median']:.3f} / {t['step_s_median']:.3f} | {r['ratio_step_ours_over_trl']:.2f} "
                    f"({r['speedup_trl_over_ours']:.1f}x) | {o['cpu_s_per_step_median']:.3f} / {t['cpu_s_per_step_median']:.3f} "
                    f"({r['cpu_speedup_trl_over_ours']:.1f}x) | {o['startup_s']:.1f} / {t['startup_s']:.1f} | "
                    f"{o['peak_rss_mb']:.0f} / {t['peak_rss_mb']:.0f} | " +
                    ", ".join(f"{k.split('/')[-1]} {o[k]:.3f} / {t[k]:.3f}" for k in o if k.startswith("eval/")) + " |")
        print(rows[-1], flush=True)
    print("\n| method | s/step ours / TRL | ours/TRL (speed-up) | CPU s/step ours / TRL (speed-up) | startup s ours / TRL | "
          "peak RSS MB ours / TRL | after equal samples ours / TRL |\n|---|---|---|---|---|---|---|\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
