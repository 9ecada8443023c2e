"""LoRA (Hu et al. 2021, arXiv:2106.09685) through PEFT, for --lora-rank R > 0 (common/run.py imports it).

Each targeted linear layer W (frozen) gets two trained matrices, A (R x in) and B (out x R, zeros at first):
    h = W x + (alpha / R) B A x        (Eq. 3 of the paper; the alpha / R scale: its §4.1)
so the model starts as it was, and only A and B (plus a scalar head, which a reward or value model trains
whole) take gradients and Adam state. The frozen base sits in the compute dtype (bf16 on a GPU: 2 bytes per
parameter instead of 20); the adapters stay fp32. The reference policy is the same model with its adapters
switched off (AdapterOff): no second copy in memory, as TRL does. A copied file may leave this module out."""

import os

import torch


def peft():
    """The PEFT package, or one line saying how to install it (requirements.txt pins it)."""
    try:
        import peft
    except ImportError:
        raise ImportError("--lora-rank needs PEFT: pip install peft==0.21.2 (requirements.txt)") from None
    return peft


def add_adapters(model, args, dtype: torch.dtype):
    """model -> a PeftModel with rank-R adapters on args.lora_target_modules ("all-linear": every linear
    layer but the output one, TRL's advice), alpha = args.lora_alpha or 2 R, no dropout; the base in `dtype`,
    frozen; the adapters and the scalar head (`score`, trained whole: modules_to_save) in fp32."""
    head = ["score"] if hasattr(model, "score") else None
    targets = args.lora_target_modules
    config = peft().LoraConfig(
        r=args.lora_rank, lora_alpha=args.lora_alpha or 2 * args.lora_rank, lora_dropout=0.0,
        target_modules=targets if targets == "all-linear" else targets.split(","),
        modules_to_save=head, exclude_modules=head,
    )  # fmt: skip
    model = peft().get_peft_model(model.to(dtype), config)
    for parameter in model.parameters():
        if parameter.requires_grad:  # NOTE: fp32 master weights for what trains, as without LoRA
            parameter.data = parameter.data.float()
    return model


class AdapterOff(torch.nn.Module):
    """The model with its adapters switched off: the base, i.e. the policy at step 0, sharing its weights.
    Not a submodule (no parameters of its own, nothing saved); eval(), requires_grad_() and to() leave the
    policy alone."""

    def __init__(self, model):
        super().__init__()
        self.__dict__["policy"] = model  # NOTE: outside _modules: not registered, not moved, not saved

    def forward(self, *args, **kwargs):
        with self.policy.disable_adapter():
            return self.policy(*args, **kwargs)

    def parameters(self, recurse=True):
        return self.policy.parameters(recurse)

    def __getattr__(self, name):  # config, device, is_activation_checkpointing: the policy's
        return getattr(self.__dict__["policy"], name)


def merged_state_dict(model) -> dict:
    """The base's state dict with every adapter folded in, W + (alpha / R) B A, and the trained head in its
    plain name: a normal model's weights. The training model is left as it is (no merge in place, which in
    bf16 would not undo exactly)."""
    base, merged = model.get_base_model(), {}
    for name, module in base.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
            weight = module.get_base_layer().weight
            delta = module.get_delta_weight("default").float()
            merged[f"{name}.weight"] = (weight.float() + delta).to(weight.dtype)
    for key, value in base.state_dict().items():
        if "lora_" in key or ".original_module." in key:
            continue
        key = key.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
        merged.setdefault(key, value)
    return merged


def save_merged(model, tokenizer, path: str) -> None:
    """--lora-merge: a plain Hugging Face model (the adapters folded in), loadable by from_pretrained."""
    from .models import save_atomic

    save_atomic(model.get_base_model(), tokenizer, path, state_dict=merged_state_dict(model))


def load_merged(path: str, model_class, dtype: torch.dtype, **head):
    """An adapter folder (adapter_config.json, as a LoRA run saves model/) as --model: its base model, from
    the folder the adapter names, with the adapter merged in."""
    config = peft().PeftConfig.from_pretrained(path)
    base_path = config.base_model_name_or_path
    if not os.path.isdir(base_path):
        raise FileNotFoundError(f"the adapter {path!r} was trained on {base_path!r}, which is not here: pass "
                                "a run saved with --lora-merge, or put the base model back")  # fmt: skip
    base = model_class.from_pretrained(base_path, dtype=dtype, use_safetensors=True, **head)
    merged = peft().PeftModel.from_pretrained(base, path).merge_and_unload()
    if "score" in (config.modules_to_save or []):  # a reward model's adapters: its trained head is in them
        merged.config.architectures = [type(merged).__name__]
    return merged
