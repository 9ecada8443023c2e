"""The task: prompts, SFT rows, pairs (JSONL); the judge (TRL's reward signature); the eval. The paint task
(common/colours.py, judges.py) loads only without a data file or for a built-in judge (correct, poet, ...)."""

import importlib.util
import json
import math
import os
import re
import zlib

import numpy as np
import torch

from .models import autocast, encode_completion, encode_prompt, sample, sampling_config, stop_token_ids

PAINT_JUDGES = ("correct", "poet", "architect", "unhinged", "answer")


def paint_task(module: str, needed_for: str):
    """common.colours or common.judges, the built-in paint task's; a clear error where a copy left it out."""
    if not os.path.exists(os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{module}.py")):
        raise ValueError(f"{needed_for} is the built-in paint-colour task's, not here (common/{module}.py): "
                         "pass --model, your own data and --judge file.py:function")  # fmt: skip
    return importlib.import_module(f"{__package__}.{module}")


def read_jsonl(path: str, fields: tuple[str, ...]) -> list[dict]:
    """Rows of a JSONL file, each checked to have the given string fields; a clear error otherwise."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path!r} does not exist: pass a JSONL file with fields {fields}")
    with open(path, encoding="utf-8") as f:
        lines = [(number, line) for number, line in enumerate(f, 1) if line.strip()]
    rows = []
    for number, line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not valid JSON ({e.msg}); one object per line") from None
        row = rows[-1] if isinstance(rows[-1], dict) else {}
        missing = [k for k in fields if not isinstance(row.get(k), str)]
        if missing:
            raise ValueError(f"{path}:{number}: row lacks string field(s) {missing}; rows need {fields}")
    if not rows:
        raise ValueError(f"{path} holds no rows: it needs at least one JSON object with fields {fields}")
    return rows


def split_by_prompt(rows: list, prompt_of=lambda row: row["prompt"], every: int = 10) -> tuple[list, list]:
    """(training rows, held-out rows): a prompt is held out, with all its rows, when crc32(prompt) % every
    == 0, so no prompt is both trained on and evaluated; in a small file where none is, the lowest hash."""
    crc = {prompt_of(row): zlib.crc32(prompt_of(row).encode()) for row in rows}
    held = {p for p, c in crc.items() if c % every == 0} or {min(crc, key=lambda p: (crc[p], p))}
    return [r for r in rows if prompt_of(r) not in held], [r for r in rows if prompt_of(r) in held]


def load_prompts(path: str | None, eval_path: str | None, batch_size: int, eval_size: int):
    """RL prompt rows {"prompt", "answer"?, ...} for training and for the eval: the user's JSONL, with the
    eval's rows from eval_path or held out by a hash of the prompt; None: the paint task's hexes."""
    if path is None:
        rows, eval_rows = paint_task("colours", "training without --prompts").paint_prompts(eval_size)
    elif eval_path is not None:
        rows, eval_rows = read_jsonl(path, ("prompt",)), read_jsonl(eval_path, ("prompt",))[:eval_size]
    else:
        rows, eval_rows = split_by_prompt(read_jsonl(path, ("prompt",)))
    if len(rows) < batch_size:
        raise ValueError(f"{len(rows)} training prompts for a batch of {batch_size}: lower --batch-size or "
                         "add prompts (a tenth of a --prompts file is held out unless --eval-prompts)")
    return rows, eval_rows[:eval_size]


def encode_examples(tokenizer, rows: list[tuple[str, str]], context: int) -> list[tuple[list, list]]:
    """(prompt, completion) texts -> (prompt_ids, completion_ids), each checked to fit the model's context."""
    examples = [(encode_prompt(tokenizer, p), encode_completion(tokenizer, p, c)) for p, c in rows]
    for (p, c), (prompt, _) in zip(examples, rows):
        if len(p) + len(c) > context:
            raise ValueError(f"prompt + completion of {len(p) + len(c)} tokens exceeds the model's context "
                             f"of {context} ({prompt[:40]!r}...): shorten the data or use a longer context")
    return examples


def load_examples(path, eval_path, tokenizer, context: int, eval_size: int, **paint):
    """SFT data, (prompt_ids, completion_ids) of each {"prompt", "completion"} row, and the eval's rows (of
    eval_path, or of a tenth of the prompts, by hash). None: the paint task's, (rng, n) -> n new examples."""
    if path is None:
        colours = paint_task("colours", "training without --data")
        return colours.paint_examples(tokenizer, context, eval_size, **paint)
    rows = [(r["prompt"], r["completion"]) for r in read_jsonl(path, ("prompt", "completion"))]
    if eval_path is not None:
        held_out = [(r["prompt"], "") for r in read_jsonl(eval_path, ("prompt", "completion"))]
    else:  # NOTE: held out by a hash of the prompt, so that no prompt is both trained on and evaluated
        rows, held_out = split_by_prompt(rows, prompt_of=lambda row: row[0])
    eval_rows = [{"prompt": p} for p in dict.fromkeys(p for p, _ in held_out)][:eval_size]
    return encode_examples(tokenizer, rows, context), eval_rows


def split_shared_prefix(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Full texts (prompt + answer, prompt + other answer) -> (prompt, chosen, rejected): the prompt is their
    common beginning, cut back to a whitespace so that no word is split ("... Red" vs "... Reddish"); the
    whitespace goes with the answers, so that prompt + answer is the text given (as TRL's extract_prompt)."""
    n = len(os.path.commonprefix([chosen, rejected]))
    while n and not chosen[n - 1].isspace() and not ((chosen + " ")[n] + (rejected + " ")[n]).isspace():
        n -= 1
    prompt = chosen[:n].rstrip()
    return prompt, chosen[len(prompt) :], rejected[len(prompt) :]


def read_pairs(path: str) -> list[dict]:
    """{prompt, chosen, rejected} rows, or {chosen, rejected} full texts that share their prompt."""
    pairs = []
    for number, row in enumerate(read_jsonl(path, ("chosen", "rejected")), 1):
        prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]
        if not isinstance(prompt, str):
            prompt, chosen, rejected = split_shared_prefix(chosen, rejected)
            if not prompt and row["chosen"] != row["rejected"]:
                raise ValueError(f"{path}: row {number} has no 'prompt' and its chosen/rejected texts share "
                                 "no prefix to use as one: add a 'prompt' field")  # fmt: skip
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


def encode_pairs(tokenizer, pairs: list, context: int, identical="skip", too_long="truncate", warn=print):
    """(prompt_ids, chosen_ids, rejected_ids), completions ending in EOS. identical (chosen equals rejected):
    "skip" or "error"; too_long: "truncate" (the tails cut to fit the context, losing EOS) or "error"."""
    encoded, n_identical, n_long = [], 0, 0
    for number, pair in enumerate(pairs, 1):
        if pair["chosen"].strip() == pair["rejected"].strip():
            if identical == "error":
                raise ValueError(f"pair {number} has chosen identical to rejected ({pair['chosen'][:40]!r}): "
                                 "remove it, or pass --identical-pairs skip")  # fmt: skip
            n_identical += 1
            continue
        prompt_ids = encode_prompt(tokenizer, pair["prompt"])
        room = context - len(prompt_ids)
        completions = [encode_completion(tokenizer, pair["prompt"], pair[k]) for k in ("chosen", "rejected")]
        if max(map(len, completions)) > room:
            if too_long == "error" or room < 1:
                length = len(prompt_ids) + max(map(len, completions))
                raise ValueError(f"pair {number}: prompt + completion of {length} tokens exceeds the model's "
                                 f"context of {context}: shorten it or pass --too-long truncate")
            n_long += 1
            completions = [c[:room] for c in completions]
        encoded.append((prompt_ids, *completions))
    if n_identical:
        warn(f"warning: skipped {n_identical} of {len(pairs)} pairs whose chosen equals rejected")
    if n_long:
        warn(f"warning: truncated {n_long} of {len(pairs)} pairs to the model's context of {context} tokens")
    if not encoded:
        raise ValueError(f"no preference pairs left after filtering ({len(pairs)} given, {n_identical} "
                         "identical): provide pairs whose chosen and rejected differ")  # fmt: skip
    return encoded


def load_pairs(data, eval_data, tokenizer, context: int, identical="skip", too_long="truncate", eval_size=64,
               save_to=None, quiet=False, **paint) -> tuple[list, list, list[dict]]:  # fmt: skip
    """Pairs encoded (encode_pairs), for training and held out (eval_data, or a tenth of data's prompts), the
    eval's rows; None: the paint task's (**paint). save_to gets the first 200 training pairs (pairs.jsonl)."""
    if data is None:
        colours = paint_task("colours", "training without --data")
        built = dict(quiet=quiet, build_heldout=eval_data is None, written_for=tokenizer, **paint)
        train, heldout, eval_rows = colours.paint_pairs(eval_size, **built)
    else:
        train = read_pairs(data)
        if eval_data is None and len({pair["prompt"] for pair in train}) < 2:
            raise ValueError(f"{data} has pairs of one prompt only: need 2 or more prompts to hold some out "
                             "(by a hash of the prompt), or pass --eval-data")  # fmt: skip
        # NOTE: held out by prompt, so that no prompt is both trained on and evaluated
        train, heldout = split_by_prompt(train) if eval_data is None else (train, None)
    heldout = read_pairs(eval_data) if eval_data is not None else heldout
    if data is not None:
        eval_rows = [{"prompt": p} for p in dict.fromkeys(pair["prompt"] for pair in heldout)][:eval_size]
    if save_to is not None:
        with open(os.path.join(save_to, "pairs.jsonl"), "w") as f:
            f.writelines(json.dumps(pair) + "\n" for pair in train[:200])
    warn = (lambda _: None) if quiet else print
    encoded = [encode_pairs(tokenizer, rows, context, identical, too_long, warn) for rows in (train, heldout)]
    return encoded[0], encoded[1], eval_rows


def get_judge(spec: str, device: str = "auto", prompts: list[str] | None = None):
    """'file.py:fn', 'module:fn', built-in judges ('poet', 'rm:PATH': common/judges.py), weighted sums
    ('0.7*poet+0.3*file.py:fn') -> one judge, its output checked (one finite score per completion)."""
    terms = []
    for term in spec.split("+"):
        weighted = re.match(r"^\s*([\d.]+)\s*\*(.*)$", term)
        weight, name = (float(weighted[1]), weighted[2].strip()) if weighted else (1.0, term.strip())
        if name in PAINT_JUDGES or name.startswith(("llm:", "rm:", "overlong:")):
            judges = paint_task("judges", f"judge {name!r}")
            terms.append((weight, judges.built_in_judge(name, device, prompts, spec)))
        elif ":" in name:
            terms.append((weight, import_judge(name)))
        else:
            raise ValueError(f"unknown judge {name!r} in {spec!r}; known judges: {', '.join(PAINT_JUDGES)}, "
                             "llm:PATH, rm:PATH, overlong:L_MAX:L_CACHE, file.py:function, module:function "
                             "and weighted sums such as 0.7*poet+0.3*correct")  # fmt: skip

    def judge(prompts, completions, **kwargs) -> list[float]:
        if len(terms) == 1 and terms[0][0] == 1.0:
            scores = list(terms[0][1](prompts, completions, **kwargs))
        else:
            scores = np.array([term(prompts, completions, **kwargs) for _, term in terms])  # (judges, N)
            scores = (np.array([weight for weight, _ in terms]) @ scores).tolist()
        if len(scores) != len(completions) or not all(map(math.isfinite, scores)):
            bad = sum(not math.isfinite(s) for s in scores)
            raise ValueError(f"judge {spec!r} returned {len(scores)} scores for {len(completions)} "
                             f"completions, {bad} non-finite (NaN, inf): it must return a finite score each")
        return scores

    judge.__name__ = spec
    return judge


def import_judge(spec: str):
    """'my_rewards:accuracy' (an importable module) or 'path/to/file.py:accuracy' -> that function."""
    where, _, name = spec.rpartition(":")
    if where.endswith(".py"):
        if not os.path.isfile(where):
            raise FileNotFoundError(f"judge file {where!r} does not exist: pass path/to/file.py:function")
        loader = importlib.util.spec_from_file_location(os.path.basename(where)[:-3], where)
        module = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise ValueError(f"judge {spec!r}: cannot import {where!r} ({e}); pass module:function or "
                             "path/to/file.py:function") from None  # fmt: skip
    if not callable(getattr(module, name, None)):
        raise ValueError(f"judge {spec!r}: {where!r} has no function {name!r}")
    return getattr(module, name)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], temperature=1.0, max_new_tokens=8, seed=None, dtype=None):
    """One completion per prompt by the training's sampler, seeded apart from the training's random stream."""
    config = sampling_config(tokenizer, model, temperature, max_new_tokens)
    with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []):
        if seed is not None:
            torch.manual_seed(seed)
        with autocast(model.device, dtype or torch.float32):
            prompt_ids, prompt_mask, completion_ids = sample(model, tokenizer, prompts, config)
    texts = [t.strip() for t in tokenizer.batch_decode(completion_ids, skip_special_tokens=True)]
    return texts, prompt_ids, prompt_mask, completion_ids


@torch.no_grad()
def sequence_kl(model, reference, prompt_ids, prompt_mask, completion_ids, mask, temperature, dtype):
    """eval/kl = KL(pi || pi_start) per completion on the eval's samples: mean_i sum_t log pi(y_it) - log
    pi_start(y_it) (k1; Schulman 2020) at the sampling temperature, through each stop token (mask). The
    reference (maybe on the host) runs on the model's device, same dtype and autocast: equal at step 0."""
    P, sequences = prompt_ids.shape[1], torch.cat([prompt_ids, completion_ids], 1)
    attention_mask = torch.cat([prompt_mask, mask.long()], 1)
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)  # left padding: real tokens start at 0
    device, home = next(model.parameters()).device, next(reference.parameters()).device

    def logprobs(m) -> torch.Tensor:  # (N, T) on the CPU, rows at a time, dropout off (eval mode)
        out, was_training = [], m.training
        for s in torch.arange(len(sequences)).split(16):
            ids, att, pos = (t[s].to(device) for t in (sequences, attention_mask, position_ids))
            with autocast(device, dtype):
                logits = m.eval()(ids, attention_mask=att, position_ids=pos, use_cache=False).logits
            logp = torch.log_softmax(logits[:, P - 1 : -1].float() / temperature, dim=-1)
            out.append(logp.gather(-1, ids[:, P:, None]).squeeze(-1).cpu())
        m.train(was_training)
        return torch.cat(out)

    policy, start = logprobs(model), logprobs(reference.to(device))
    reference.to(home)
    return float(((policy - start) * mask.cpu()).sum(1).mean())


def evaluate(model, tokenizer, judge, rows: list[dict], temperature=1.0, max_new_tokens=8, dtype=None,
             reference=None, seed=0) -> tuple[dict, list[dict]]:  # fmt: skip
    """One name per held-out row, sampled as in training (seeded): eval/reward (the judge, given the rows'
    other columns), eval/distinct, eval/kl (to the starting policy), the paint task's metrics; the samples."""
    prompts = [row["prompt"] for row in rows]
    columns = {key: [row.get(key) for row in rows] for key in rows[0] if key != "prompt"}
    names, prompt_ids, prompt_mask, completion_ids = generate(
        model, tokenizer, prompts, temperature, max_new_tokens, seed, dtype)  # fmt: skip
    stop_ids, dtype = stop_token_ids(tokenizer, model), dtype or torch.float32
    is_stop = torch.isin(completion_ids, torch.tensor(stop_ids, device=completion_ids.device))
    first_stop = torch.where(is_stop.any(1), is_stop.float().argmax(1), completion_ids.shape[1])
    mask = torch.arange(completion_ids.shape[1], device=completion_ids.device)[None] <= first_stop[:, None]
    ids = [row[m].tolist() for row, m in zip(completion_ids.cpu(), mask.cpu())]  # up to each stop token
    rewards = judge(prompts, names, completion_ids=ids, **columns)
    metrics = {"eval/reward": float(np.mean(rewards)), "eval/distinct": len(set(names)) / len(names)}
    metrics["eval/top_name_share"] = max(map(names.count, set(names))) / len(names)  # a collapse: one name
    if all(isinstance(answer, str) for answer in columns.get("answer", [None])):  # right answers repeat too
        metrics["eval/distinct_answers"] = len(set(columns["answer"])) / len(rows)
    if os.path.exists(os.path.join(os.path.dirname(__file__), "judges.py")):  # the paint task's metrics
        metrics.update(paint_task("judges", "eval/correct").paint_metrics(prompts, names, columns))
    if reference is not None:
        args = (prompt_ids, prompt_mask, completion_ids, mask, temperature, dtype)
        metrics["eval/kl"] = sequence_kl(model, reference, *args)
    samples = [{"prompt": p, "completion": n, "reward": r} for p, n, r in zip(prompts, names, rewards)]
    return metrics, samples
