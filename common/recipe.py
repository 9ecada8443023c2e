"""The shipped painter's recipe (python sft.py without --model builds it from scratch): a word-level tokenizer
over the colour names, so that every name it samples is made of real words, and a small Llama."""

from collections import Counter

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from .colours import PROMPT, as_completion, color_names, xkcd_names
from .models import encode_completion, encode_prompt

HEX_DIGIT = Regex(
    "(?<=#|#[0-9a-fA-F]|#[0-9a-fA-F]{2}|#[0-9a-fA-F]{3}|#[0-9a-fA-F]{4}|#[0-9a-fA-F]{5})[0-9a-fA-F]"
)


def build_tokenizer(
    kind: str, texts: list[str], vocab_size: int = 1024, min_count: int = 2
) -> PreTrainedTokenizerFast:
    """A tokenizer trained offline on the data: "word" = one token per whitespace-separated word seen
    at least min_count times; "bpe" / "byte" = byte-level BPE with vocab_size / no merges. The six hex
    digits after '#' are always single tokens, so every colour is spelt the same way."""
    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    split_hex = [pre_tokenizers.Split(HEX_DIGIT, "isolated"), pre_tokenizers.Split("#", "isolated")]
    if kind == "word":
        pre = pre_tokenizers.Sequence(split_hex + [pre_tokenizers.WhitespaceSplit()])
        counts = Counter(w for t in texts for w, _ in pre.pre_tokenize_str(t))
        vocab = specials + sorted(w for w, n in counts.items() if n >= min_count)
        tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
        # decoding joins words with spaces
        tokenizer.pre_tokenizer, tokenizer.decoder = pre, decoders.WordPiece()
    else:
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            split_hex + [pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
        tokenizer.decoder = decoders.ByteLevel()
        size = vocab_size if kind == "bpe" else len(specials) + 256
        trainer = trainers.BpeTrainer(
            vocab_size=size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
        tokenizer.train_from_iterator(texts, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
    )


def new_model(
    tokenizer, d_model: int, n_layers: int, n_heads: int, d_ff: int, context: int = 64
) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=d_model,
        intermediate_size=d_ff,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_heads,
        max_position_embeddings=context,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def painter_texts(rows: list[tuple[str, str]] | None) -> list[str]:
    """What the tokenizer is built from: the user's prompts and completions, or every colour name and the
    prompt with each hex digit."""
    if rows:
        return [p for p, _ in rows] + [c for _, c in rows]
    return [PROMPT.format(hex="#" + d * 6) for d in "0123456789abcdef"] + [
        n for n, _ in color_names("train") + xkcd_names()
    ]


def trainable_names(tokenizer, context: int) -> tuple[tuple[tuple[str, str], ...], ...]:
    """The training names and the plain (xkcd) names the model can learn: none with a word the tokenizer
    lacks (it would teach the model to say <unk>), none too long to fit the context after the prompt."""
    prompt = PROMPT.format(hex="#000000")
    room = context - len(encode_prompt(tokenizer, prompt))

    def fits(name: str) -> bool:
        ids = encode_completion(tokenizer, prompt, as_completion(tokenizer, name))
        return len(ids) <= room and tokenizer.unk_token_id not in ids

    return tuple(r for r in color_names("train") if fits(r[0])), tuple(
        r for r in xkcd_names("train") if fits(r[0])
    )


def new_painter(data: str | None, eval_data: str | None, kind: str, d_model: int, n_layers: int, n_heads: int,
                d_ff: int) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:  # fmt: skip
    """sft.py without --model: a tokenizer over the training data's words (the JSONL's training rows, or every
    colour name) and a small Llama with fresh weights (torch's random state)."""
    from .task import read_jsonl, split_by_prompt

    rows = None
    if data is not None:  # the training rows, as sft.py holds them out
        rows = [(r["prompt"], r["completion"]) for r in read_jsonl(data, ("prompt", "completion"))]
        rows = rows if eval_data is not None else split_by_prompt(rows, prompt_of=lambda row: row[0])[0]
    tokenizer = build_tokenizer(kind, painter_texts(rows), min_count=2 if rows is None else 1)
    return new_model(tokenizer, d_model, n_layers, n_heads, d_ff), tokenizer
