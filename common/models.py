"""Loading and saving any Hugging Face causal LM (the shipped painter by default), mixed precision, encoding
prompts and completions, and the sampler's settings: the plumbing that is the same for every method."""

import os
import shutil

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GenerationConfig,
)

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
    step changes ~0.2% of the painter's weights in bf16 and ~all of them in fp32
    (tests/test_real_models.py). TRL's GRPOTrainer (fp32 weights under autocast;
    trl/trainer/grpo_trainer.py model init, @f2cd577) and verl (fp32 actor and critic, bf16 compute;
    verl/workers/fsdp_workers.py mixed-precision settings) do the same. dtype float32 = autocast off, bit
    for bit as without it."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout makes the training forward differ from generation (ratio != 1 at the first update)."""
    for name in list(vars(model.config)):
        if name.endswith("dropout") or name.endswith("_pdrop"):
            setattr(model.config, name, 0.0)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def load_tokenizer(path: str):
    """Tokenizer with left padding (for generation) and a pad token.

    NOTE: when a tokenizer has no pad token we reuse EOS. That is safe here because no script finds
    padding by comparing with pad_token_id: masks come from lengths, stop ids or the attention mask, so a real
    EOS at the end of a completion is always trained and scored (TRL issue #1623 is the failure mode).
    """
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_model_and_tokenizer(
    model: str | None = None,
    device: str = "auto",
    dtype: str = "float32",
    model_class=AutoModelForCausalLM,
    **kwargs,
):
    """Any HF model by local path or hub id (None = the shipped painter), dropout off, on device.
    dtype is the dtype of the WEIGHTS: float32 for a model that is trained (the default; compute in bf16 comes
    from `autocast`), "auto" (bf16 on cuda) or bfloat16 for a frozen one (reference, judge, reward model)."""
    path = model or PAINTER
    device_, dtype_ = resolve_device_dtype(device, dtype)
    looks_local = path.startswith((".", "/", "~")) or os.path.exists(path)
    if looks_local and not os.path.isdir(os.path.expanduser(path)):
        raise FileNotFoundError(
            f"model path {path!r} is not a directory: pass a saved model folder or a hub id"
        )
    try:
        tokenizer = load_tokenizer(os.path.expanduser(path))
        # safetensors only: never unpickle weights; trust_remote_code stays off (transformers' default)
        net = model_class.from_pretrained(
            os.path.expanduser(path), dtype=dtype_, use_safetensors=True, **kwargs
        )
    except OSError as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OSError(
            f"could not load model {path!r} ({first_line}); pass a local folder, or a hub id "
            "on a machine that can reach the hub"
        ) from None
    if net.config.pad_token_id is None:
        net.config.pad_token_id = tokenizer.pad_token_id
    disable_dropout(net)
    return net.to(device_), tokenizer


def load_reward_model(path: str, tokenizer, device: str):
    """A reward model saved by reward_model.py, checked to be one and to share the policy's tokenizer.
    NOTE: a different tokenizer is REFUSED, not re-tokenised: the RM reads the policy's token ids and the
    value model, initialised from the RM, must give a value per POLICY token. `--judge rm:PATH` (which
    decodes the text and re-encodes it with the RM's own tokenizer) is the way to use such a model."""
    reward_model, rm_tokenizer = load_model_and_tokenizer(
        path, device, model_class=AutoModelForSequenceClassification
    )
    if (
        not any(a.endswith("ForSequenceClassification") for a in reward_model.config.architectures or [])
        or reward_model.config.num_labels != 1
    ):
        raise ValueError(
            f"--reward-model {path!r} is not a reward model (a sequence-classification model with one "
            f"label, as reward_model.py saves); its architectures are {reward_model.config.architectures}"
        )
    if (
        rm_tokenizer.get_vocab() != tokenizer.get_vocab()
        or rm_tokenizer.eos_token_id != tokenizer.eos_token_id
    ):
        raise ValueError(
            f"--reward-model {path!r} has a different tokenizer from the policy's: ppo_rlhf.py scores the "
            "policy's token ids and starts the value model from the RM, so they must match; train the RM "
            "from the policy (reward_model.py --model ...) or use --judge rm:PATH, which re-tokenises text"
        )
    return reward_model.eval().requires_grad_(False)


def context_length(model) -> int:
    return getattr(model.config, "max_position_embeddings", None) or 1 << 30


# ---- prompts, completions and the tokens that end them -------------------------------------------------


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Prompt token ids: through the chat template when the tokenizer has one, else the raw text."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


def end_of_turn_id(tokenizer) -> int:
    """The token that ends an answer: the chat template's end-of-turn (<|im_end|>, <end_of_turn>, <|eot_id|>),
    found by rendering an assistant turn and reading the special token right after its text; else EOS."""
    if getattr(tokenizer, "chat_template", None):
        marker = "Sunset Dust"
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": "Name a colour"}, {"role": "assistant", "content": marker}],
                tokenize=False,
            )
        except Exception:  # a template that refuses this conversation: fall back to EOS
            text = ""
        if marker in text:
            after = tokenizer(text[text.rindex(marker) + len(marker) :], add_special_tokens=False)[
                "input_ids"
            ]
            added = tokenizer.added_tokens_decoder
            if after and after[0] in added and added[after[0]].special:
                return after[0]
    return tokenizer.eos_token_id


def encode_completion(tokenizer, prompt: str, completion: str) -> list[int]:
    """Completion token ids, ending with the token that teaches the model to stop (EOS, or with a chat
    template its end-of-turn token), appended only when the text does not already end with one.

    NOTE: the ids are cut from the tokenisation of the prompt and completion TOGETHER (through the chat
    template when there is one), after checking that the prompt's own ids are a prefix of it (TRL's SFT
    trainer does the same check). Tokenised alone, a SentencePiece tokenizer puts its space marker on the
    completion's first word and the data gets a token that never follows the prompt in generation
    (transformers #26273)."""
    prompt_ids = encode_prompt(tokenizer, prompt)
    end = end_of_turn_id(tokenizer)
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}],
            tokenize=False,
        )
        whole, alone = tokenizer(text, add_special_tokens=False)["input_ids"], completion
    else:
        whole, alone = tokenizer(prompt + " " + completion.strip())["input_ids"], " " + completion.strip()
    if whole[: len(prompt_ids)] == prompt_ids:
        ids = whole[len(prompt_ids) :]
    else:  # the template rewrites the prompt, or a token spans the boundary: the completion on its own
        ids = tokenizer(alone, add_special_tokens=False)["input_ids"]
    enders = [i for i, t in enumerate(ids) if t in (end, tokenizer.eos_token_id)]
    return ids[: enders[0] + 1] if enders else ids + [end]


def encode_examples(
    tokenizer, rows: list[tuple[str, str]], context: int
) -> list[tuple[list[int], list[int]]]:
    """(prompt, completion) texts -> (prompt_ids, completion_ids), each checked to fit the model's context."""
    examples = [(encode_prompt(tokenizer, p), encode_completion(tokenizer, p, c)) for p, c in rows]
    for (p, c), (prompt, _) in zip(examples, rows):
        if len(p) + len(c) > context:
            raise ValueError(
                f"prompt + completion of {len(p) + len(c)} tokens exceeds the model's context of "
                f"{context} ({prompt[:40]!r}...): shorten the data or use a longer-context model"
            )
    return examples


# ---- the sampler: exactly the policy the loss differentiates -------------------------------------------


def stop_token_ids(tokenizer, model) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS, the model's own EOS list (Qwen2.5 instruct
    stops on <|im_end|> and <|endoftext|>, gemma-3 on <eos> and <end_of_turn>, Llama-3 instruct on
    <|eot_id|> and <|end_of_text|>) and the chat template's end-of-turn. Used for generation and for the
    masks alike (a mask that knew only EOS would train the padding after <|im_end|> as actions; TRL PR
    #7039)."""
    ids = {tokenizer.eos_token_id, end_of_turn_id(tokenizer)}
    for config in (getattr(model, "generation_config", None), model.config):
        eos = getattr(config, "eos_token_id", None)
        ids |= set(eos) if isinstance(eos, (list, tuple)) else {eos}
    return sorted(i for i in ids if i is not None)


def sampling_config(tokenizer, model, temperature: float, max_new_tokens: int) -> GenerationConfig:
    """Plain sampling from softmax(logits / temperature): no top-k, top-p, min-p or penalty, built from our
    flags only (TRL builds its GenerationConfig from scratch for the same reason: trl/trainer/grpo_trainer.py
    @f2cd577, around lines 1108-1124), stopping on every stop id."""
    return GenerationConfig(
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        eos_token_id=stop_token_ids(tokenizer, model),
        pad_token_id=tokenizer.pad_token_id,
    )


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


def shared_cache(model, prompt_ids, prompt_mask, positions, **keep):
    """(k, the KV cache of the prompts' first k columns for each of the b prompts): the columns that every
    prompt shares run once for the batch, and their keys and values are copied b times; (0, None) when they
    share none. NOTE: the copies are made in autograd: in backward the gradients of the b rows are summed into
    the one computation."""
    k = shared_prefix(prompt_ids, prompt_mask)
    if not k:
        return 0, None
    out = model(
        prompt_ids[:1, :k], attention_mask=prompt_mask[:1, :k], position_ids=positions[:1, :k],
        use_cache=True, **keep,
    )  # fmt: skip
    out.past_key_values.batch_repeat_interleave(len(prompt_ids))
    return k, out.past_key_values


def completion_forward(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    hidden: bool = False,
) -> torch.Tensor:
    """The model on b left-padded prompts (b, P), each followed by r completions (b*r, T): rows i*r ..
    i*r+r-1 follow prompt i (a GRPO group, a preference pair). Returns the logits (b*r, T, V) that predict
    each completion token, or with hidden=True the final hidden states (b*r, T, D) at each completion token
    (a reward model's head reads the last real one).
    NOTE: nothing runs twice. The columns that all prompts share (the painter's "<bos> Name this paint
    color: #") run once for the batch, each prompt's rest once for its r completions, and the completions
    attend to copies of the prompts' keys and values; in backward the gradient flows through the copies: the
    same log-probs and gradient as b*r forwards over prompt + completion (tests/test_common.py). On the
    painter a GRPO step's forward and backward take 2.4x less time. The lm head runs only where a completion
    token is predicted (logits_to_keep). When the layers recompute their activations (gradient checkpointing
    drops the cache), one forward over prompt + completion."""
    b, P = prompt_ids.shape
    r = len(completion_ids) // b  # completions per prompt
    attention_mask = torch.cat([prompt_mask.repeat_interleave(r, 0), completion_mask.long()], dim=1)
    positions = (attention_mask.cumsum(1) - 1).clamp(min=0)  # NOTE: left padding: real tokens start at 0
    inputs = completion_ids if hidden else completion_ids[:, :-1]  # the last token predicts nothing
    L = P + inputs.shape[1]
    last = {} if hidden else {"logits_to_keep": 1}
    checkpointing = getattr(getattr(model, "module", model), "is_activation_checkpointing", False)
    k, cache = (
        (0, None) if checkpointing else shared_cache(model, prompt_ids, prompt_mask, positions[::r], **last)
    )
    if r == 1 or checkpointing:  # the rest of each prompt and its completion in one forward
        keep = {} if hidden else {"logits_to_keep": completion_ids.shape[1]}
        ids = torch.cat([prompt_ids[:, k:].repeat_interleave(r, 0), inputs], dim=1)
        out = model(
            ids, attention_mask=attention_mask[:, :L], position_ids=positions[:, k:L], past_key_values=cache,
            use_cache=cache is not None, output_hidden_states=hidden, **keep,
        )  # fmt: skip
        return out.hidden_states[-1][:, P - k :] if hidden else out.logits
    prompt_out = model(
        prompt_ids[:, k:], attention_mask=prompt_mask, position_ids=positions[::r, k:P],
        past_key_values=cache, use_cache=True, **last,
    )  # fmt: skip
    # the logits that predict each completion's first token (a reward model reads only hidden states)
    first = None if hidden else prompt_out.logits[:, -1:].repeat_interleave(r, 0)
    if inputs.shape[1] == 0:  # one-token completions (every one stopped at once): nothing more to run
        return first
    cache = prompt_out.past_key_values
    cache.batch_repeat_interleave(r)  # (b, ...) -> (b*r, ...): each completion sees its prompt
    out = model(
        inputs, attention_mask=attention_mask[:, :L], position_ids=positions[:, P:L], past_key_values=cache,
        use_cache=True, output_hidden_states=hidden,
    )  # fmt: skip
    if hidden:
        return out.hidden_states[-1]
    return torch.cat([first, out.logits], dim=1)


def draw(probs: torch.Tensor) -> torch.Tensor:
    """One token per row of probs (N, V), by the inverse CDF: u ~ U(0, 1), the first token whose cumulative
    probability exceeds u (sums in float64). NOTE: the distribution of torch.multinomial, which is 3x slower
    on a CPU (tests/bench/levers.py)."""
    cdf = probs.double().cumsum(-1)
    u = torch.rand(len(cdf), 1, dtype=cdf.dtype, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=cdf.shape[1] - 1)


@torch.no_grad()
def sample(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    config: GenerationConfig,
    repeats: int = 1,
    return_logprobs: bool = False,
):
    """`repeats` completions of each left-padded prompt (b, P), drawn from softmax(logits / temperature) and
    nothing else, in eval mode (dropout off), with a KV cache: the sequences (b*repeats, P+T), rows i*r ..
    i*r+r-1 prompt i's; with return_logprobs also each drawn token's log-prob under the distribution it was
    drawn from (b*repeats, T). A row that has stopped is padded with pad_token_id; sampling ends when every
    row has stopped or after max_new_tokens.
    NOTE: a loop of our own rather than model.generate: generate fills every field the config leaves unset
    from the checkpoint's generation_config (a repetition_penalty of 1.05-1.1 on several instruct models,
    min_p, no_repeat_ngram_size), so the rollouts would come from another policy than the one whose
    log-probs the loss uses; and on a small model its per-token bookkeeping costs more than the model
    (tests/bench/README.md). The prompt runs once for its r completions, as in completion_forward."""
    P, T = prompt_ids.shape[1], config.max_new_tokens
    if P + T > context_length(model):
        raise ValueError(
            f"prompt of {P} tokens + {T} new tokens exceeds the model's context of {context_length(model)}: "
            "shorten the prompt or --max-new-tokens"
        )
    stop_ids = torch.tensor(config.eos_token_id, device=prompt_ids.device).view(-1)
    was_training = model.training
    model.eval()
    try:
        positions = (prompt_mask.cumsum(1) - 1).clamp(min=0)
        out = model(
            prompt_ids, attention_mask=prompt_mask, position_ids=positions, use_cache=True, logits_to_keep=1
        )
        cache = out.past_key_values
        if repeats > 1:
            cache.batch_repeat_interleave(repeats)
        logits = out.logits[:, -1].float().repeat_interleave(repeats, 0)  # (N, V)
        attention_mask = prompt_mask.repeat_interleave(repeats, 0)
        position = positions[:, -1:].repeat_interleave(repeats, 0)
        stopped = torch.zeros(len(logits), dtype=torch.bool, device=logits.device)
        tokens, logprobs = [], []
        for _ in range(T):
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
            out = model(
                token[:, None], attention_mask=attention_mask, position_ids=position, past_key_values=cache,
                use_cache=True,
            )  # fmt: skip
            logits = out.logits[:, -1].float()
        sequences = torch.cat([prompt_ids.repeat_interleave(repeats, 0), torch.stack(tokens, 1)], dim=1)
        return (sequences, torch.cat(logprobs, 1)) if return_logprobs else sequences
    finally:
        model.train(was_training)


def save_atomic(model, tokenizer, path: str) -> None:
    """save_pretrained (safetensors) into a temporary folder, then swap it in: a crash never leaves half a
    model. A trained model is saved as it is trained, in fp32 (its master weights); frozen bf16 copies are
    never saved."""
    tmp, old = path.rstrip("/") + ".tmp", path.rstrip("/") + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
