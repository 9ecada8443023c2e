"""Small models built on this machine, with the quirks of real ones, for tests/ and tests/bench/gpu_check.py.

- `chatml_tokenizer`: a chat template whose end-of-turn token (<|im_end|>) is not EOS, as Qwen2.5's;
- `qwen3_tokenizer`: ChatML whose assistant turn opens with an empty think block, as Qwen3's template renders
  a turn without reasoning, and whose generation prompt holds the block only with enable_thinking=False;
- `sentencepiece_tokenizer`: no template, a leading-space marker on every word, as Llama-2's and Mistral's,
  so that a completion tokenised alone gets an extra "▁" token;
- `save_random_model`: a random-init Llama or Qwen2 with a saved generation_config of our choosing (a
  repetition penalty, a no-repeat n-gram size, several EOS ids), as instruct checkpoints ship them.
Nothing is downloaded: the configs are written here.
"""

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

WORDS = (
    "Name this paint color: Sunset Dust Navy Blue Burnt Sienna Ochre Slate Grey Rose Mist Deep Sea Lemon "
    "Cinnamon Toast Mulled Wine Yes No Is a good evocative name for the Answer or user assistant system"
).split()
HEX_DIGIT = Regex(
    "(?<=#|#[0-9a-fA-F]|#[0-9a-fA-F]{2}|#[0-9a-fA-F]{3}|#[0-9a-fA-F]{4}|#[0-9a-fA-F]{5})[0-9a-fA-F]"
)
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chatml_tokenizer(vocab_size: int | None = None) -> PreTrainedTokenizerFast:
    """Word level; EOS is </s> (id 2), the template's end-of-turn <|im_end|>, and <|endoftext|> is one more
    special token (a model may list it among its EOS ids). vocab_size pads the vocabulary with filler
    words."""
    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]
    vocab = specials + list(dict.fromkeys(WORDS + ["#"] + list("0123456789abcdef")))
    vocab += [f"w{i}" for i in range(len(vocab), vocab_size or 0)]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(HEX_DIGIT, "isolated"),
            pre_tokenizers.Split("#", "isolated"),
            pre_tokenizers.WhitespaceSplit(),
        ]
    )
    tokenizer.decoder = decoders.WordPiece()
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=specials[4:],
        padding_side="left",
    )
    wrapped.chat_template = CHATML
    return wrapped


# Qwen3's template (Qwen/Qwen3-8B, tokenizer_config.json) reduced to what matters here: the last assistant
# turn is "<think>\n" + reasoning + "\n</think>\n\n" + content, the block empty without reasoning; the
# generation prompt is "<|im_start|>assistant\n", the model opening the block itself, unless
# enable_thinking=False
QWEN3 = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'assistant' %}<think>\n\n</think>\n\n{% endif %}"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)


def qwen3_tokenizer(enable_thinking: bool = True) -> PreTrainedTokenizerFast:
    """chatml_tokenizer with Qwen3's template; <think> and </think> are added tokens that are not special, as
    in Qwen3's tokenizer. enable_thinking=False: the template as Qwen3 renders it with that flag, the empty
    block in the generation prompt."""
    tokenizer = chatml_tokenizer()
    tokenizer.add_tokens(["<think>", "</think>"])
    flag = "" if enable_thinking else "{% set enable_thinking = false %}"
    tokenizer.chat_template = flag + QWEN3
    return tokenizer


def sentencepiece_tokenizer() -> PreTrainedTokenizerFast:
    """Llama-2-style normalisation ("▁" prepended, spaces become "▁"), word pieces, BOS, no template."""
    pieces = (
        ["<pad>", "<s>", "</s>", "<unk>", "▁"]
        + ["▁" + w for w in WORDS]
        + ["▁#" + h for h in ("d48475", "1f4e79")]
    )
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(pieces)}, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        add_bos_token=True,
    )
    from tokenizers import processors

    wrapped._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    return wrapped


def save_random_model(
    path: str,
    tokenizer,
    arch: str = "llama",
    hidden: int = 32,
    layers: int = 2,
    heads: int = 2,
    kv_heads: int | None = None,
    intermediate: int = 64,
    vocab_size: int | None = None,
    context: int = 128,
    generation: dict | None = None,
    dtype=None,
    seed: int = 0,
    device=None,
) -> str:
    """A random-init causal LM saved with safetensors (in `dtype`, as checkpoints ship, e.g. bf16), its
    tokenizer, and a generation_config holding `generation` (e.g. repetition_penalty=2.0, eos_token_id=[2,
    6])."""
    import torch

    torch.manual_seed(seed)
    config_class, model_class = (
        (LlamaConfig, LlamaForCausalLM) if arch == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    )
    config = config_class(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=context,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # random init on a GPU takes seconds, not minutes, for 0.5B parameters
    with torch.device(device or "cpu"):
        model = model_class(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **{"eos_token_id": tokenizer.eos_token_id, **(generation or {})},
    )
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
