"""Loading and sampling: any Hugging Face causal LM (the shipped painter by default), prompts and completions
as token ids, the sampler, a forward that runs each prompt once, and saving. No algorithm code."""

import os
import shutil

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from transformers import GenerationConfig
from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()
PAINTER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "painter")


def resolve_device_dtype(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """The device and the COMPUTE dtype: auto = cuda with bf16 when a GPU is present, else cpu with fp32."""
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return torch.device(device), getattr(torch, dtype)


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision: matmuls in `dtype` (bf16), weights, optimizer state and reductions in fp32.
    NOTE: trained weights stay fp32 because a bf16 weight cannot hold a small update: at lr 1e-6 one AdamW
    step changes ~0.2% of the painter's weights in bf16 and ~all of them in fp32 (tests/test_real_models.py).
    TRL's GRPOTrainer (trl/trainer/grpo_trainer.py model init, @f2cd577) and verl (verl/workers/
    fsdp_workers.py mixed-precision settings) do the same. float32 = autocast off, bit for bit."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def load_model_and_tokenizer(
    model: str | None = None, device="auto", dtype: str = "float32", scalar_head=False, reward_model_for=None
):
    """Any HF model by local path or hub id (None = the shipped painter), dropout off, on device, and its
    tokenizer (left padding, a pad token). dtype is the dtype of the WEIGHTS: float32 for a trained model
    (compute in bf16 comes from `autocast`), "auto" (bf16 on cuda) for a frozen one. scalar_head: a sequence
    classifier with one output (a reward or value model; a causal LM checkpoint gets a new head).
    reward_model_for=tokenizer: a reward model saved by reward_model.py, checked to be one and to share that
    tokenizer (it reads the policy's token ids; --judge rm:PATH re-tokenises text instead)."""
    path = os.path.expanduser(model or PAINTER)
    looks_local = model is None or model.startswith((".", "/", "~")) or os.path.exists(path)
    if looks_local and not os.path.isdir(path):
        raise FileNotFoundError(f"model path {path!r} is not a directory: pass a model folder or a hub id")
    head = dict(num_labels=1) if scalar_head or reward_model_for else {}
    model_class = AutoModelForSequenceClassification if head else AutoModelForCausalLM
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        # safetensors only: never unpickle weights; trust_remote_code stays off (transformers' default)
        dtype = resolve_device_dtype(device, dtype)[1]
        net = model_class.from_pretrained(path, dtype=dtype, use_safetensors=True, **head)
    except OSError as e:
        first_line = (str(e).strip() or type(e).__name__).splitlines()[0]
        raise OSError(f"could not load model {path!r} ({first_line}); pass a local folder, or a hub id on "
                      "a machine that can reach the hub") from None  # fmt: skip
    # NOTE: no pad token: EOS is reused. Safe because no mask here compares ids with pad_token_id: masks come
    # from lengths, stop ids or the attention mask, so a real EOS is always trained (TRL #1623 is the failure)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if net.config.pad_token_id is None:
        net.config.pad_token_id = tokenizer.pad_token_id
    if reward_model_for is not None:
        if not (net.config.architectures or [""])[0].endswith("ForSequenceClassification"):
            raise ValueError(f"--reward-model {path!r} is not a reward model (a sequence classifier with one "
                             f"label, as reward_model.py saves): {net.config.architectures}")  # fmt: skip
        if tokenizer.get_vocab() != reward_model_for.get_vocab():
            raise ValueError(f"--reward-model {path!r} has a different tokenizer from the policy's: train it "
                             "from the policy (reward_model.py --model ...) or use --judge rm:PATH, which "
                             "re-tokenises the text")  # fmt: skip
    for name in list(vars(net.config)):  # dropout off: the training forward must be the sampler's policy
        if name.endswith(("dropout", "_pdrop")):
            setattr(net.config, name, 0.0)
    for module in net.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return net.to(resolve_device_dtype(device)[0]), tokenizer


def new_painter(data, eval_data, tokenizer: str, d_model: int, n_layers: int, n_heads: int, d_ff: int):
    """A new painter by its recipe (sft.py without --model), the paint task's: common/recipe.py."""
    from .recipe import new_painter as build

    return build(data, eval_data, tokenizer, d_model, n_layers, n_heads, d_ff)


def context_length(model) -> int:
    return getattr(model.config, "max_position_embeddings", None) or 1 << 30


# ---- prompts, completions and the tokens that end them -------------------------------------------------


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Prompt token ids: through the chat template when the tokenizer has one, else the raw text."""
    if getattr(tokenizer, "chat_template", None):
        turn = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


def end_of_turn_id(tokenizer) -> int:
    """The token that ends an answer: the chat template's end-of-turn (<|im_end|>, <end_of_turn>, <|eot_id|>),
    found by rendering an assistant turn and reading the special token right after its text; else EOS."""
    if getattr(tokenizer, "chat_template", None):
        marker, turns = "Sunset Dust", [{"role": "user", "content": "Name a colour"}]
        try:
            turns.append({"role": "assistant", "content": marker})
            text = tokenizer.apply_chat_template(turns, tokenize=False)
        except Exception:  # a template that refuses this conversation: fall back to EOS
            text = ""
        if marker in text:
            tail = text[text.rindex(marker) + len(marker) :]
            after = tokenizer(tail, add_special_tokens=False)["input_ids"]
            added = tokenizer.added_tokens_decoder
            if after and after[0] in added and added[after[0]].special:
                return after[0]
    return tokenizer.eos_token_id


def encode_completion(tokenizer, prompt: str, completion: str) -> list[int]:
    """Completion token ids, ending with the token that teaches the model to stop (EOS, or with a chat
    template its end-of-turn token), appended only when the text does not already end with one.
    NOTE: cut from the tokenisation of prompt and completion TOGETHER (through the chat template when there is
    one), once the prompt's own ids are checked to be a prefix of it (as TRL's SFT trainer). Tokenised alone,
    a SentencePiece tokenizer puts its space marker on the first word, a token that never follows the prompt
    in generation (transformers #26273)."""
    prompt_ids, end = encode_prompt(tokenizer, prompt), end_of_turn_id(tokenizer)
    if getattr(tokenizer, "chat_template", None):
        turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        whole = tokenizer(tokenizer.apply_chat_template(turns, tokenize=False), add_special_tokens=False)
        whole, alone = whole["input_ids"], completion
    else:
        whole, alone = tokenizer(prompt + " " + completion.strip())["input_ids"], " " + completion.strip()
    if whole[: len(prompt_ids)] == prompt_ids:
        ids = whole[len(prompt_ids) :]
    else:  # the template rewrites the prompt, or a token spans the boundary: the completion on its own
        ids = tokenizer(alone, add_special_tokens=False)["input_ids"]
    enders = [i for i, t in enumerate(ids) if t in (end, tokenizer.eos_token_id)]
    return ids[: enders[0] + 1] if enders else ids + [end]


def stop_token_ids(tokenizer, model) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS, the model's own EOS list (Qwen2.5 instruct stops
    on <|im_end|> and <|endoftext|>, Llama-3 on <|eot_id|> and <|end_of_text|>) and the chat template's
    end-of-turn; for generation and masks alike (a mask knowing only EOS trains padding; TRL PR #7039)."""
    ids = {tokenizer.eos_token_id, end_of_turn_id(tokenizer)}
    for config in (getattr(model, "generation_config", None), model.config):
        eos = getattr(config, "eos_token_id", None)
        ids |= set(eos) if isinstance(eos, (list, tuple)) else {eos}
    return sorted(i for i in ids if i is not None)


# ---- the sampler: exactly the policy the loss differentiates -------------------------------------------


def sampling_config(tokenizer, model, temperature: float, max_new_tokens: int) -> GenerationConfig:
    """Plain sampling from softmax(logits / temperature): no top-k, top-p, min-p or penalty, built from our
    flags only (as TRL: trl/trainer/grpo_trainer.py @f2cd577, lines 1108-1124), stopping on every stop id."""
    return GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                            max_new_tokens=max_new_tokens, eos_token_id=stop_token_ids(tokenizer, model),
                            pad_token_id=tokenizer.pad_token_id)  # fmt: skip


def draw(probs: torch.Tensor) -> torch.Tensor:
    """One token per row of probs (N, V), by the inverse CDF: u ~ U(0, 1), the first token whose cumulative
    probability exceeds u (sums in float64); torch.multinomial's distribution, 3x faster on a CPU."""
    cdf = probs.double().cumsum(-1)
    u = torch.rand(len(cdf), 1, dtype=cdf.dtype, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=cdf.shape[1] - 1)


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], config, repeats=1, return_logprobs=False):
    """`repeats` completions of each text prompt, drawn from softmax(logits / temperature) and nothing else,
    in eval mode, with a KV cache: prompt_ids, prompt_mask (b, P), left padded (through the chat template when
    there is one), and completion_ids (b*repeats, T), rows i*r .. i*r+r-1 prompt i's, padded with
    pad_token_id after a stop id; with return_logprobs also each token's log-prob when drawn (b*repeats, T).
    NOTE: our own loop, not model.generate, which fills every field the config leaves unset from the
    checkpoint's generation_config (a repetition_penalty of 1.05-1.1 on several instruct models, min_p), so
    the rollouts would come from another policy than the loss's; and on a small model its bookkeeping costs
    more than the model (tests/bench/README.md). Each prompt runs once for its r completions."""
    ids = [encode_prompt(tokenizer, p) for p in prompts]
    if max(map(len, ids)) + config.max_new_tokens > context_length(model):
        raise ValueError(f"prompt of {max(map(len, ids))} tokens + {config.max_new_tokens} new tokens "
                         f"exceeds the model's context of {context_length(model)}: shorten it or "
                         "--max-new-tokens")  # fmt: skip
    encoded = tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt").to(model.device)
    prompt_ids, prompt_mask = encoded["input_ids"], encoded["attention_mask"]
    stop_ids = torch.tensor(config.eos_token_id, device=prompt_ids.device).view(-1)
    was_training = model.training
    model.eval()
    try:
        positions = (prompt_mask.cumsum(1) - 1).clamp(min=0)
        out = model(prompt_ids, attention_mask=prompt_mask, position_ids=positions, use_cache=True,
                    logits_to_keep=1)  # fmt: skip
        cache = out.past_key_values
        if repeats > 1:
            cache.batch_repeat_interleave(repeats)
        logits = out.logits[:, -1].float().repeat_interleave(repeats, 0)  # (N, V)
        attention_mask = prompt_mask.repeat_interleave(repeats, 0)
        position = positions[:, -1:].repeat_interleave(repeats, 0)
        stopped = torch.zeros(len(logits), dtype=torch.bool, device=logits.device)
        tokens, logprobs = [], []
        for _ in range(config.max_new_tokens):
            token = draw(torch.softmax(logits / config.temperature, dim=-1))  # (N,)
            if return_logprobs:
                logprobs.append(torch.log_softmax(logits / config.temperature, -1).gather(1, token[:, None]))
            token = torch.where(stopped, config.pad_token_id, token)
            tokens.append(token)
            stopped |= torch.isin(token, stop_ids)
            if stopped.all():
                break
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
            position = position + 1
            out = model(token[:, None], attention_mask=attention_mask, position_ids=position,
                        past_key_values=cache, use_cache=True)  # fmt: skip
            logits = out.logits[:, -1].float()
        completion_ids = torch.stack(tokens, 1)
        logprobs = (torch.cat(logprobs, 1),) if return_logprobs else ()
        return (prompt_ids, prompt_mask, completion_ids, *logprobs)
    finally:
        model.train(was_training)


# ---- a forward that runs each prompt once: a speed-up, tested equal to the plain forward ---------------

# NOTE: one more call of the model costs about what 60-100 token positions of the painter cost on a CPU core;
# below 256 saved positions sharing the prompts' common columns does not pay (tests/bench/README.md)
SHARE_FROM = 256


def shared_prefix(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> int:
    """How many leading columns every prompt of the batch shares (ids and padding alike), at most P - 1:
    the painter's "<bos> Name this paint color: #", half of each prompt; 0 when sharing them would not pay."""
    if (len(prompt_ids) - 1) * (prompt_ids.shape[1] - 1) < SHARE_FROM:  # cannot pay, whatever is shared:
        return 0  # no comparison (and no GPU sync) for GRPO's 8 prompts or PPO's minibatches
    same = (prompt_ids == prompt_ids[:1]).all(0) & (prompt_mask == prompt_mask[:1]).all(0)
    k = min(int(same.long().cumprod(0).sum()), prompt_ids.shape[1] - 1)
    return k if (len(prompt_ids) - 1) * k >= SHARE_FROM else 0


def forward_sharing_prompts(
    model, input_ids, attention_mask, position_ids, prompt_length: int, repeats: int, hidden: bool = False
) -> torch.Tensor:
    """The forward of N = b*r rows (N, L) whose first P = prompt_length columns are b prompts, each repeated r
    times (rows i*r .. i*r+r-1 share prompt i), computed with each prompt run ONCE. Returns exactly
        model(input_ids, attention_mask=..., position_ids=..., logits_to_keep=L - P + 1).logits  (N, L-P+1, V)
    or with hidden=True the final hidden states after the prompt (N, L-P, D),
        model(..., output_hidden_states=True).hidden_states[-1][:, P:]
    (tests/test_common.py: equal in float64, and their gradients). The columns that every prompt shares (the
    painter's "<bos> Name this paint color: #") run once for the batch, each prompt's rest once for its r
    rows, which attend to copies of its keys and values; in backward the gradients of the copies add up. A
    GRPO step's forward and backward take 2.4x less time on the painter. With gradient checkpointing (which
    drops the cache) it is the plain forward."""
    P, L, r = prompt_length, input_ids.shape[1], repeats
    prompt_ids, prompt_mask, positions = (t[::r, :P] for t in (input_ids, attention_mask, position_ids))
    last = {} if hidden else {"logits_to_keep": 1}
    checkpointing = getattr(getattr(model, "module", model), "is_activation_checkpointing", False)
    k = 0 if checkpointing else shared_prefix(prompt_ids, prompt_mask)
    cache = None
    if k:  # the shared columns once, their keys and values copied to the b prompts
        out = model(prompt_ids[:1, :k], attention_mask=prompt_mask[:1, :k],
                    position_ids=positions[:1, :k], use_cache=True, **last)  # fmt: skip
        cache = out.past_key_values
        cache.batch_repeat_interleave(len(prompt_ids))
    if r == 1 or checkpointing:  # the rest of each prompt and its completion in one forward
        keep = {} if hidden else {"logits_to_keep": L - P + 1}
        out = model(input_ids[:, k:], attention_mask=attention_mask, position_ids=position_ids[:, k:],
                    past_key_values=cache, use_cache=cache is not None, output_hidden_states=hidden,
                    **keep)  # fmt: skip
        return out.hidden_states[-1][:, P - k :] if hidden else out.logits
    prompt_out = model(prompt_ids[:, k:], attention_mask=prompt_mask, position_ids=positions[:, k:],
                       past_key_values=cache, use_cache=True, **last)  # fmt: skip
    # the logits of the prompt's last column (a reward model reads only hidden states)
    first = None if hidden else prompt_out.logits[:, -1:].repeat_interleave(r, 0)
    if L == P:  # nothing after the prompts (one-token completions, whose last token is not fed)
        return first
    cache = prompt_out.past_key_values
    cache.batch_repeat_interleave(r)  # (b, ...) -> (b*r, ...): each row sees its prompt
    out = model(input_ids[:, P:], attention_mask=attention_mask, position_ids=position_ids[:, P:],
                past_key_values=cache, use_cache=True, output_hidden_states=hidden)  # fmt: skip
    return out.hidden_states[-1] if hidden else torch.cat([first, out.logits], dim=1)


def save_atomic(model, tokenizer, path: str) -> None:
    """save_pretrained (safetensors, the trained fp32 weights) into a temporary folder, then swapped in: a
    crash never leaves half a model."""
    tmp, old = path.rstrip("/") + ".tmp", path.rstrip("/") + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
