"""Loading and saving any Hugging Face causal LM (the shipped painter by default), and encoding prompts."""
import os
import shutil

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

PAINTER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "painter")


def resolve_device_dtype(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """auto = cuda with bf16 when a GPU is present, else cpu with fp32."""
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return torch.device(device), getattr(torch, dtype)


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
    padding by comparing with pad_token_id: masks come from lengths or the attention mask, so a real
    EOS at the end of a completion is always trained and scored (TRL issue #1623 is the failure mode).
    """
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_model_and_tokenizer(model: str | None = None, device: str = "auto", dtype: str = "auto",
                             model_class=AutoModelForCausalLM, **kwargs):
    """Any HF model by local path or hub id (None = the shipped painter), dropout off, on device/dtype."""
    path = model or PAINTER
    device_, dtype_ = resolve_device_dtype(device, dtype)
    looks_local = path.startswith((".", "/", "~")) or os.path.exists(path)
    if looks_local and not os.path.isdir(os.path.expanduser(path)):
        raise FileNotFoundError(f"model path {path!r} is not a directory: pass a saved model folder or a hub id")
    try:
        tokenizer = load_tokenizer(os.path.expanduser(path))
        # safetensors only: never unpickle weights; trust_remote_code stays off (transformers' default)
        net = model_class.from_pretrained(os.path.expanduser(path), dtype=dtype_, use_safetensors=True, **kwargs)
    except OSError as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OSError(f"could not load model {path!r} ({first_line}); pass a local folder, or a hub id "
                      "on a machine that can reach the hub") from None
    if net.config.pad_token_id is None:
        net.config.pad_token_id = tokenizer.pad_token_id
    if getattr(net, "generation_config", None) is not None and net.generation_config.pad_token_id is None:
        net.generation_config.pad_token_id = tokenizer.pad_token_id
    disable_dropout(net)
    return net.to(device_), tokenizer


def context_length(model) -> int:
    return getattr(model.config, "max_position_embeddings", None) or 1 << 30


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Prompt token ids: through the chat template when the tokenizer has one, else the raw text."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


def encode_completion(tokenizer, completion: str) -> list[int]:
    """Completion token ids followed by EOS, the token that teaches the model to stop."""
    text = completion if getattr(tokenizer, "chat_template", None) else " " + completion.strip()
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def save_atomic(model, tokenizer, path: str) -> None:
    """save_pretrained (safetensors) into a temporary folder, then swap it in: a crash never leaves half a model."""
    tmp, old = path.rstrip("/") + ".tmp", path.rstrip("/") + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
