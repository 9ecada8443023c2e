"""Loading and sampling any Hugging Face causal LM (the shipped painter by default): prompts and completions
as token ids, the sampler, a forward that runs each prompt once, saving."""

import contextlib
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
    dtype = ("bfloat16" if device.startswith("cuda") else "float32") if dtype == "auto" else dtype
    return torch.device(device), getattr(torch, dtype)


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision: matmuls in `dtype` (bf16), weights, optimizer state and reductions in fp32 (TRL's
    GRPOTrainer @f2cd577, verl's fsdp_workers.py): a bf16 weight cannot hold a 1e-6 update. fp32: off."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def load_model_and_tokenizer(
    model: str | None = None, device="auto", dtype: str = "float32", scalar_head=False, reward_model_for=None
):
    """Any HF model by path or hub id (None = the shipped painter), dropout off, and its tokenizer (left
    padding, a pad token). dtype: of the WEIGHTS, float32 for a trained model (bf16 compute comes from
    autocast), "auto" for a frozen one. scalar_head: a sequence classifier with one output (a reward or value
    model). reward_model_for=tokenizer: reward_model.py's output, checked to be one, with that tokenizer."""
    path = os.path.expanduser(model or PAINTER)
    looks_local = model is None or model.startswith((".", "/", "~")) or os.path.exists(path)
    adapter = os.path.isfile(os.path.join(path, "adapter_config.json"))  # a LoRA run's model/ (PEFT's format)
    if looks_local and not (adapter or os.path.isfile(os.path.join(path, "config.json"))):
        what = "has no config.json" if os.path.isdir(path) else "is not a directory"
        raise FileNotFoundError(f"model path {path!r} {what}: pass a folder written by save_pretrained "
                                "(config.json, *.safetensors, the tokenizer) or a hub id")  # fmt: skip
    head = dict(num_labels=1) if scalar_head or reward_model_for else {}
    model_class = AutoModelForSequenceClassification if head else AutoModelForCausalLM
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        # safetensors only: never unpickle weights; trust_remote_code stays off (transformers' default)
        dtype = resolve_device_dtype(device, dtype)[1]
        if adapter:  # its base model with the adapters merged in (common/lora.py)
            from .lora import load_merged

            net = load_merged(path, model_class, dtype, **head)
        else:
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
    policy = reward_model_for
    if policy is not None and not (net.config.architectures or [""])[0].endswith("SequenceClassification"):
        raise ValueError(f"--reward-model {path!r} is not a reward model (reward_model.py's output)")
    if policy is not None and tokenizer.get_vocab() != policy.get_vocab():
        raise ValueError(f"--reward-model {path!r} has a different tokenizer from the policy's: train it "
                         "from the policy (reward_model.py --model ...) or use --judge rm:PATH")
    # dropout off: the training forward must be the sampler's policy
    for name in [name for name in vars(net.config) if name.endswith(("dropout", "_pdrop"))]:
        setattr(net.config, name, 0.0)
    for module in [module for module in net.modules() if isinstance(module, torch.nn.Dropout)]:
        module.p = 0.0
    return net.to(resolve_device_dtype(device)[0]), tokenizer


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
    turns, text = [{"role": "user", "content": "Name a colour"}, {"role": "assistant", "content": "Dust"}], ""
    with contextlib.suppress(Exception):  # no template, or one that refuses this conversation: EOS
        text = tokenizer.apply_chat_template(turns, tokenize=False)
    tail = text[text.rindex("Dust") + 4 :] if "Dust" in text else ""
    after = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
    added = tokenizer.added_tokens_decoder
    return after[0] if after and after[0] in added and added[after[0]].special else tokenizer.eos_token_id


def encode_completion(tokenizer, prompt: str, completion: str) -> list[int]:
    """Completion token ids, ending with the token that teaches the model to stop (EOS, or a chat template's
    end-of-turn), all a template puts after encode_prompt's ids (Qwen3's empty think block too, which the
    model emits itself). NOTE: cut from prompt and completion tokenised TOGETHER, as TRL's SFT trainer: alone,
    a SentencePiece tokenizer puts its space marker on the first word, a token never seen after the prompt."""
    prompt_ids, end = encode_prompt(tokenizer, prompt), end_of_turn_id(tokenizer)
    if getattr(tokenizer, "chat_template", None):
        turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        whole = tokenizer(tokenizer.apply_chat_template(turns, tokenize=False), add_special_tokens=False)
        whole, alone = whole["input_ids"], completion
    else:  # NOTE: as written (" name", indentation), as TRL: trl/trainer/sft_trainer.py @f2cd577, line 1476
        whole, alone = tokenizer(prompt + completion)["input_ids"], completion
    if whole[: len(prompt_ids)] == prompt_ids:
        ids = whole[len(prompt_ids) :]
    else:  # the template rewrites the prompt, or a token spans the boundary: the completion on its own
        ids = tokenizer(alone, add_special_tokens=False)["input_ids"]
    enders = [i for i, t in enumerate(ids) if t in (end, tokenizer.eos_token_id)]
    return ids[: enders[0] + 1] if enders else ids + [end]


def stop_token_ids(tokenizer, model) -> list[int]:
    """Every id that ends a completion: EOS, the model's EOS list (Qwen2.5: <|im_end|>, <|endoftext|>), the
    template's end-of-turn; for generation and masks alike (a mask knowing only EOS trains padding)."""
    ids = {tokenizer.eos_token_id, end_of_turn_id(tokenizer)}
    for config in (getattr(model, "generation_config", None), model.config):
        eos = getattr(config, "eos_token_id", None)
        ids |= set(eos) if isinstance(eos, (list, tuple)) else {eos}
    return sorted(i for i in ids if i is not None)


def sampling_config(tokenizer, model, temperature: float, max_new_tokens: int) -> GenerationConfig:
    """Plain sampling from softmax(logits / temperature): no top-k, top-p, min-p or penalty, built from our
    flags only (as TRL: trl/trainer/grpo_trainer.py @f2cd577, lines 1108-1124), stopping on every stop id."""
    if not temperature > 0:  # NOTE: 0 would divide by zero: NaN probabilities, one garbage token
        raise ValueError(f"--temperature {temperature}: the sampler divides the logits by it; pass a "
                         "positive value (1.0 samples the model as it is, 0.1 nearly greedily)")
    return GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                            max_new_tokens=max_new_tokens, eos_token_id=stop_token_ids(tokenizer, model),
                            pad_token_id=tokenizer.pad_token_id)  # fmt: skip


def draw(probs: torch.Tensor) -> torch.Tensor:
    """One token per row of probs (N, V) by the inverse CDF (the first whose cumulative probability exceeds
    u ~ U(0, 1), in float64): torch.multinomial's distribution, 3x faster on a CPU."""
    cdf = probs.double().cumsum(-1)
    u = torch.rand(len(cdf), 1, dtype=cdf.dtype, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=cdf.shape[1] - 1)


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], config, repeats=1, return_logprobs=False):
    """`repeats` completions of each prompt from softmax(logits / temperature), nothing else (NOTE: not
    model.generate, which fills unset settings from the checkpoint's, as repetition_penalty: another policy),
    in eval mode with a KV cache, each prompt run once: prompt_ids, prompt_mask (b, P), left padded,
    completion_ids (b*r, T), rows i*r .. i*r+r-1 prompt i's, pad after a stop id (and each token's logprob)"""
    ids = [encode_prompt(tokenizer, p) for p in prompts]
    context = getattr(model.config, "max_position_embeddings", None) or 1 << 30
    if max(map(len, ids)) + config.max_new_tokens > context:
        raise ValueError(f"prompt of {max(map(len, ids))} tokens + {config.max_new_tokens} new tokens "
                         f"exceeds the model's context of {context}: shorten it or --max-new-tokens")
    encoded = tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt").to(model.device)
    prompt_ids, prompt_mask = encoded["input_ids"], encoded["attention_mask"]
    stop_ids = torch.tensor(config.eos_token_id, device=prompt_ids.device).view(-1)
    was_training, fsdp = model.training, hasattr(model, "set_reshard_after_forward")
    model.eval()
    layers = contextlib.nullcontext()
    if fsdp:  # FSDP: each layer gathered once for all the new tokens (common/fsdp.py)
        from .fsdp import gathered

        layers = gathered(model)
    try:
        with layers:
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
                    logp = torch.log_softmax(logits / config.temperature, -1)
                    logprobs.append(logp.gather(1, token[:, None]))
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
            logprobs = (torch.cat(logprobs, 1),) if return_logprobs else ()
            return (prompt_ids, prompt_mask, torch.stack(tokens, 1), *logprobs)
    finally:
        model.train(was_training)


SHARE_FROM = 256  # NOTE: one more model call costs 60-100 token positions of the painter: below 256, a loss


def shared_prefix(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> int:
    """How many leading columns every prompt of the batch shares (ids and padding), at most P - 1: the
    painter's "<bos> Name this paint color: #"; 0 when sharing them would not pay (no GPU sync then)."""
    if (len(prompt_ids) - 1) * (prompt_ids.shape[1] - 1) < SHARE_FROM:
        return 0
    same = (prompt_ids == prompt_ids[:1]).all(0) & (prompt_mask == prompt_mask[:1]).all(0)
    k = min(int(same.long().cumprod(0).sum()), prompt_ids.shape[1] - 1)
    return k if (len(prompt_ids) - 1) * k >= SHARE_FROM else 0


def forward_sharing_prompts(
    model, input_ids, attention_mask, position_ids, prompt_length: int, repeats: int, hidden: bool = False
) -> torch.Tensor:
    """The forward of N = b*r rows (N, L) whose first P = prompt_length columns hold b prompts, each repeated
    r times (rows i*r .. i*r+r-1), with each prompt run ONCE; exactly (tests/test_common.py: float64, grads)
        model(input_ids, attention_mask=..., position_ids=..., logits_to_keep=L - P + 1).logits  (N, L-P+1, V)
        or, hidden=True, model(..., output_hidden_states=True).hidden_states[-1][:, P:]         (N, L-P, D)
    The shared columns run once for the batch, each prompt's rest once for its r rows, which attend to copies
    of its keys and values: a GRPO step 2.4x faster here. Under gradient checkpointing (no cache) and FSDP
    (where every rank must run as many forwards): plain."""
    P, L, r = prompt_length, input_ids.shape[1], repeats
    prompt_ids, prompt_mask, positions = (t[::r, :P] for t in (input_ids, attention_mask, position_ids))
    last = {} if hidden else {"logits_to_keep": 1}
    checkpointing = getattr(getattr(model, "module", model), "is_activation_checkpointing", False)
    plain = checkpointing or hasattr(model, "set_reshard_after_forward")  # FSDP: each rank, same forwards
    k = 0 if plain else shared_prefix(prompt_ids, prompt_mask)
    cache = None
    if k:  # the shared columns once, their keys and values copied to the b prompts
        out = model(prompt_ids[:1, :k], attention_mask=prompt_mask[:1, :k],
                    position_ids=positions[:1, :k], use_cache=True, **last)  # fmt: skip
        cache = out.past_key_values
        cache.batch_repeat_interleave(len(prompt_ids))
    if r == 1 or plain:  # the rest of each prompt and its completion in one forward
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


def save_atomic(model, tokenizer, path: str, state_dict=None) -> None:
    """save_pretrained (safetensors; state_dict: these weights, not the model's) into a temporary folder, then
    swapped in: never half a model."""
    tmp, old = path.rstrip("/") + ".tmp", path.rstrip("/") + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
