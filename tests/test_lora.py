"""--lora-rank: PEFT adapters on the frozen painter. The reference is the model with its adapters off (the
base model's log-probs exactly, no copy of its weights); a run trains only the adapters (and a scalar head);
model/ is PEFT's adapter folder, or with --lora-merge a plain model that from_pretrained and --model load;
the learning rate default is 10x. Resume: tests/test_resume.py, tests/test_ddp.py."""

import dataclasses
import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import grpo
import ppo_rlhf
import reward_model
from common.lora import AdapterOff, add_adapters
from common.models import PAINTER, load_model_and_tokenizer
from common.run import Run
from conftest import assert_one_line_error, run_one_step, run_script, saved_weights

PROMPT = "Name this paint color: #d48475"


@dataclasses.dataclass
class LoraArgs:
    lora_rank: int = 4
    lora_alpha: float | None = None
    lora_target_modules: str = "all-linear"


def logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(ids).logits


def test_the_reference_is_the_base_model_with_the_adapters_off_and_no_copy():
    base, tokenizer = load_model_and_tokenizer()
    expected = logits(base, tokenizer)
    model = add_adapters(load_model_and_tokenizer()[0], LoraArgs(), torch.float32)
    for name, parameter in model.named_parameters():  # trained adapters: B is no longer zero
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.5)
    reference = AdapterOff(model)
    assert torch.equal(logits(reference, tokenizer), expected)  # exactly the base model's
    assert (logits(model, tokenizer) - expected).abs().max() > 1e-2  # the adapters do act
    assert dict(reference.named_parameters(recurse=False)) == {} and reference.state_dict() == {}
    shared = {p.data_ptr() for p in model.parameters()}
    assert all(p.data_ptr() in shared for p in reference.parameters())  # the policy's weights, not a copy
    model.train()
    reference.eval()
    assert model.training  # switching the reference to eval leaves the policy alone


def test_only_the_adapters_train_and_are_saved_in_peft_format(tmp_path):
    run_dir = run_one_step(grpo, tmp_path, lora_rank=4, learning_rate=1e-2)
    model_dir = os.path.join(run_dir, "model")
    config = json.load(open(os.path.join(model_dir, "adapter_config.json")))
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["peft_type"] == "LORA"
    adapter = load_file(os.path.join(model_dir, "adapter_model.safetensors"))
    assert adapter and all("lora_A" in k or "lora_B" in k for k in adapter)
    assert max(float(w.abs().max()) for k, w in adapter.items() if "lora_B" in k) > 0  # B left zero: moved
    (checkpoint,) = [f for f in os.listdir(os.path.join(run_dir, "checkpoints")) if f.startswith("step-")]
    trained = load_file(os.path.join(run_dir, "checkpoints", checkpoint, "model.safetensors"))
    assert trained and all("lora_" in k for k in trained)  # the frozen base is not in the checkpoint
    # the adapter folder as --model: the painter with the adapters merged; what they do not touch is the same
    merged, _ = load_model_and_tokenizer(model_dir)
    painter = load_file(os.path.join(PAINTER, "model.safetensors"))
    weights = merged.state_dict()
    untouched = [k for k in painter if "proj" not in k]  # embeddings, norms
    assert untouched and all(torch.equal(weights[k], painter[k]) for k in untouched)
    assert any(not torch.equal(weights[k], painter[k]) for k in painter if "proj" in k)


def test_the_merged_model_is_a_plain_model_that_from_pretrained_and_model_load(tmp_path):
    adapter_run = run_one_step(grpo, tmp_path / "a", lora_rank=4, learning_rate=1e-2)
    merged_run = run_one_step(grpo, tmp_path / "m", lora_rank=4, learning_rate=1e-2, lora_merge=True)
    merged_dir = os.path.join(merged_run, "model")
    assert not os.path.exists(os.path.join(merged_dir, "adapter_config.json"))
    plain = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert set(plain.state_dict()) == set(load_model_and_tokenizer()[0].state_dict())
    via_peft, tokenizer = load_model_and_tokenizer(os.path.join(adapter_run, "model"))  # PEFT's own merge
    assert torch.allclose(logits(plain, tokenizer), logits(via_peft, tokenizer), atol=1e-5)
    result = run_script("grpo.py", "--model", merged_dir, "--total-steps", "1", "--eval-size", "4",
                        "--judge", "correct", "--output-dir", str(tmp_path / "again"))  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("script", [reward_model, ppo_rlhf], ids=lambda m: m.__name__)
def test_a_reward_or_value_model_trains_its_adapters_and_its_whole_head(script, tmp_path):
    run_dir = run_one_step(script, tmp_path, lora_rank=4)
    folder = os.path.join(run_dir, "checkpoints", "step-1" if script is ppo_rlhf else "latest")
    if script is reward_model:
        folder = os.path.join(run_dir, "checkpoints", open(folder).read().strip())
    name = "value_model" if script is ppo_rlhf else "model"
    trained = load_file(os.path.join(folder, f"{name}.safetensors"))
    head = [k for k in trained if "score" in k]
    assert head == ["base_model.model.score.modules_to_save.default.weight"], head
    assert all("lora_" in k for k in trained if k not in head) and len(trained) > 1
    if script is reward_model:  # model/: the adapters and the head (PEFT's format), a --reward-model as it is
        model_dir = os.path.join(run_dir, "model")
        assert "base_model.model.score.weight" in saved_weights(model_dir)
        loaded = load_model_and_tokenizer(model_dir, reward_model_for=load_model_and_tokenizer()[1])[0]
        assert torch.equal(loaded.score.weight, trained[head[0]])


def test_the_learning_rate_default_is_ten_times_with_lora(tmp_path):
    defaults = (1e-3, 1e-6)  # grpo.py's: the painter's, another model's
    full = Run("grpo", grpo.Args(output_dir=str(tmp_path)), learning_rate=defaults).args.learning_rate
    lora = Run("grpo", grpo.Args(output_dir=str(tmp_path), lora_rank=8), learning_rate=defaults).args
    other = Run("grpo", grpo.Args(output_dir=str(tmp_path), lora_rank=8, model="x"), learning_rate=defaults)
    assert (full, lora.learning_rate, other.args.learning_rate) == pytest.approx((1e-3, 1e-2, 1e-5))


def test_fsdp_without_torchrun_is_refused_in_one_line(tmp_path):  # with --lora-rank: tests/test_fsdp.py
    result = run_script("grpo.py", "--fsdp", "--output-dir", str(tmp_path))
    assert_one_line_error(result, "--fsdp shards over torchrun's processes")
