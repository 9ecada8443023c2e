"""What a real checkpoint brings that the painter does not: bf16 compute, its own sampling settings, several
EOS ids, chat templates, SentencePiece spaces, a 150k vocabulary. Checked on small models built here
(tests/local_models.py) with the same quirks."""

import copy
import json

import pytest
import torch
from local_models import chatml_tokenizer, qwen3_tokenizer, save_random_model, sentencepiece_tokenizer

import dpo
import grpo
import ppo_rlhf
import reinforce
import reward_model
import sft
from common.models import PAINTER, encode_completion, encode_prompt, load_model_and_tokenizer, sample
from common.models import sampling_config, stop_token_ids
from common.judges import LLM_QUESTION, llm_judge, yes_no_ids
from common.models import end_of_turn_id
from common.recipe import build_tokenizer
from conftest import run_one_step, saved_weights

PROMPT = "Name this paint color: #d48475"
RL_SCRIPTS = [grpo, reinforce, ppo_rlhf]


# ---- chat templates, SentencePiece spaces, stop ids --------------------------------------------------------


def test_a_chat_completion_ends_with_the_templates_end_of_turn_not_eos():
    tokenizer = chatml_tokenizer()
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_id(tokenizer) == im_end != tokenizer.eos_token_id
    ids = encode_completion(tokenizer, PROMPT, "Sunset Dust")
    assert tokenizer.convert_ids_to_tokens(ids) == ["Sunset", "Dust", "<|im_end|>"]
    # prompt + completion is exactly the template's rendering of the conversation, up to the end-of-turn
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": "Sunset Dust"}], tokenize=False
    )
    rendered = tokenizer(text, add_special_tokens=False)["input_ids"]
    prompt = encode_prompt(tokenizer, PROMPT)
    assert (
        rendered[: len(prompt) + len(ids)] == prompt + ids and rendered[len(prompt) + len(ids) - 1] == im_end
    )


def test_an_end_token_already_in_the_text_is_not_doubled():
    chat, piece = chatml_tokenizer(), sentencepiece_tokenizer()
    assert encode_completion(chat, PROMPT, "Sunset Dust<|im_end|>") == encode_completion(
        chat, PROMPT, "Sunset Dust"
    )
    assert encode_completion(piece, PROMPT, "Sunset Dust</s>") == encode_completion(
        piece, PROMPT, "Sunset Dust"
    )
    assert encode_completion(piece, PROMPT, "Sunset Dust").count(piece.eos_token_id) == 1


def test_a_sentencepiece_completion_gets_no_extra_space_token():
    tokenizer = sentencepiece_tokenizer()
    alone = tokenizer(" Sunset Dust", add_special_tokens=False)["input_ids"]
    # the trap: tokenised alone, a lone space marker first
    assert tokenizer.convert_ids_to_tokens(alone)[0] == "▁"
    ids = encode_completion(tokenizer, PROMPT, "Sunset Dust")
    assert tokenizer.convert_ids_to_tokens(ids) == ["▁Sunset", "▁Dust", "</s>"]
    whole = tokenizer(PROMPT + " Sunset Dust")["input_ids"]
    assert encode_prompt(tokenizer, PROMPT) + ids[:-1] == whole  # what follows the prompt in one tokenisation
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Sunset Dust"


def test_stop_ids_are_eos_the_models_eos_list_and_the_end_of_turn(tmp_path):
    tokenizer = chatml_tokenizer()
    extra = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    path = save_random_model(str(tmp_path / "m"), tokenizer, generation={"eos_token_id": [2, extra]})
    model, tokenizer = load_model_and_tokenizer(path)
    assert stop_token_ids(tokenizer, model) == sorted(
        [2, extra, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    )
    painter, painter_tokenizer = load_model_and_tokenizer()
    assert stop_token_ids(painter_tokenizer, painter) == [painter_tokenizer.eos_token_id]


def test_the_llm_judge_reads_the_answer_token_as_it_follows_the_question():
    plain = build_tokenizer(
        "bpe", ["Answer Yes or No. Yes", "Answer Yes or No. No", "Yes No"] * 10, vocab_size=300
    )
    # not "Yes": after text comes a space
    assert plain.convert_ids_to_tokens(yes_no_ids(plain)) == ["ĠYes", "ĠNo"]
    assert "Yes" in plain.get_vocab()  # the token the old lookup took, which never follows the question
    chat = chatml_tokenizer()
    assert chat.convert_ids_to_tokens(yes_no_ids(chat)) == ["Yes", "No"]  # after "<|im_start|>assistant\n"


def test_a_plain_text_completion_is_joined_to_the_prompt_as_it_is():
    code = ["def f(x):\n    return x\n", "def g(y):\n\n    return y\n"] * 10
    plain = build_tokenizer("bpe", code + [PROMPT + " Sunset Dust"] * 10, vocab_size=300)
    assert not plain.chat_template
    # a leading newline and indentation, after a prompt with or without its own newline: all of it kept
    for prompt, completion in [("def f(x):\n", "    return x"), ("def g(y):\n", "\n    return y")]:
        ids = encode_completion(plain, prompt, completion)
        assert ids[-1] == plain.eos_token_id
        assert plain.decode(ids, skip_special_tokens=True) == completion
    # the space a plain-text completion begins with is its own, as in TRL's data (" Sunset Dust")
    ids = encode_completion(plain, PROMPT, " Sunset Dust")
    assert encode_prompt(plain, PROMPT) + ids[:-1] == plain(PROMPT + " Sunset Dust")["input_ids"]


def questions_and_answer_probabilities(model, tokenizer, prompts, names, lead_in=()) -> list[float]:
    """What the llm: judge computes, the plain way: each question alone (no padding), a full forward over all
    its logits, P("Yes") / (P("Yes") + P("No")) at the last position after the template's lead-in."""
    yes, no = yes_no_ids(tokenizer)
    scores = []
    for prompt, name in zip(prompts, names):
        question = LLM_QUESTION.format(completion=name, hex=prompt[-7:])
        ids = torch.tensor([encode_prompt(tokenizer, question) + list(lead_in)])
        with torch.no_grad():
            logits = model(ids).logits[0, -1]  # (V,)
        scores.append(float(logits[[yes, no]].softmax(-1)[0]))
    return scores


def recorded_forwards(monkeypatch, model_class) -> list[dict]:
    """Each call of model_class's forward from now on: its batch size ("rows") and keyword arguments."""
    calls, forward = [], model_class.forward

    def record(self, input_ids=None, **kwargs):
        calls.append({"rows": len(input_ids), **kwargs})
        return forward(self, input_ids, **kwargs)

    monkeypatch.setattr(model_class, "forward", record)
    return calls


JUDGED_PROMPTS = [f"Name this paint color: #{h}" for h in ("d48475", "1f4e79", "a1b2c3", "000000", "ffffff")]
JUDGED_NAMES = ["Sunset Dust", "Navy", "Slate Grey", "Deep Sea", "Mist"]


def test_the_llm_judge_reads_only_the_last_logits_in_bounded_batches_without_a_cache(tmp_path, monkeypatch):
    from transformers import LlamaForCausalLM

    path = save_random_model(str(tmp_path / "m"), chatml_tokenizer(vocab_size=500), layers=1)
    monkeypatch.setattr("common.judges.LLM_QUESTIONS_PER_FORWARD", 2, raising=False)
    calls = recorded_forwards(monkeypatch, LlamaForCausalLM)
    prompts, names = JUDGED_PROMPTS, JUDGED_NAMES
    scores = llm_judge(path, device="cpu")(prompts, names)
    assert [c["rows"] for c in calls] == [2, 2, 1]  # 5 questions, at most 2 a forward
    assert all(c.get("logits_to_keep") == 1 and c.get("use_cache") is False for c in calls)
    model, tokenizer = load_model_and_tokenizer(path)
    expected = questions_and_answer_probabilities(model, tokenizer, prompts, names)
    assert torch.allclose(torch.tensor(scores), torch.tensor(expected), atol=1e-5)


def test_an_empty_think_block_is_the_models_to_emit_and_the_judge_reads_the_answer_after_it(tmp_path):
    tokenizer = qwen3_tokenizer()
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_id(tokenizer) == im_end
    # the generation prompt stops at "<|im_start|>assistant\n": the sampled policy opens and closes the block
    # itself, so SFT's completion holds it, and prompt + completion is the template's rendering of the turn
    ids = encode_completion(tokenizer, PROMPT, "Sunset Dust")
    assert tokenizer.convert_ids_to_tokens(ids) == ["<think>", "</think>", "Sunset", "Dust", "<|im_end|>"]
    turns = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": "Sunset Dust"}]
    rendered = tokenizer(tokenizer.apply_chat_template(turns, tokenize=False), add_special_tokens=False)
    prompt = encode_prompt(tokenizer, PROMPT)
    assert rendered["input_ids"][: len(prompt) + len(ids)] == prompt + ids
    # with enable_thinking=False the generation prompt holds the block, and the completion does not
    no_thinking = qwen3_tokenizer(enable_thinking=False)
    ids = encode_completion(no_thinking, PROMPT, "Sunset Dust")
    assert no_thinking.convert_ids_to_tokens(ids) == ["Sunset", "Dust", "<|im_end|>"]
    # the judge's answer comes after the block, not "<think>"
    assert tokenizer.convert_ids_to_tokens(yes_no_ids(tokenizer)) == ["Yes", "No"]
    assert no_thinking.convert_ids_to_tokens(yes_no_ids(no_thinking)) == ["Yes", "No"]
    path = save_random_model(str(tmp_path / "m"), tokenizer, layers=1)
    prompts, names = JUDGED_PROMPTS, JUDGED_NAMES
    scores = llm_judge(path, device="cpu")(prompts, names)
    model, tokenizer = load_model_and_tokenizer(path)
    lead_in = tokenizer.convert_tokens_to_ids(["<think>", "</think>"])
    expected = questions_and_answer_probabilities(model, tokenizer, prompts, names, lead_in)
    assert torch.allclose(torch.tensor(scores), torch.tensor(expected), atol=1e-5)


# ---- the sampler samples the policy the loss differentiates ------------------------------------------------


@pytest.fixture(scope="module")
def quirky_model(tmp_path_factory):
    """A random model whose saved generation_config would change sampling and stop on a second EOS id."""
    tokenizer = chatml_tokenizer()
    extra = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    path = save_random_model(
        str(tmp_path_factory.mktemp("quirky") / "m"),
        tokenizer,
        hidden=32,
        layers=2,
        generation={"repetition_penalty": 2.0, "no_repeat_ngram_size": 1, "eos_token_id": [2, extra]},
    )
    model, tokenizer = load_model_and_tokenizer(path)
    return model, tokenizer, extra


def sampled_with_scores(model, tokenizer, temperature, leak: bool = False):
    """64 completions of 4 prompts, with the sampler's own log-probs of the drawn tokens."""
    prompts = [PROMPT, "Name this paint color: #1f4e79", "Name a color:", "Name this color:"]
    encoded = tokenizer.pad(
        {"input_ids": [encode_prompt(tokenizer, p) for p in prompts]}, padding=True, return_tensors="pt"
    )
    config = sampling_config(tokenizer, model, temperature, max_new_tokens=12)
    P = encoded["input_ids"].shape[1]
    torch.manual_seed(0)
    if leak:  # what a plain generate(generation_config=...) does: the model's own settings fill the gaps
        config.output_scores, config.return_dict_in_generate = True, True
        with torch.no_grad():
            out = model.generate(
                encoded["input_ids"].repeat_interleave(16, 0),
                attention_mask=encoded["attention_mask"].repeat_interleave(16, 0),
                generation_config=config,
            )
        sequences = out.sequences
        logprobs = (
            torch.stack([torch.log_softmax(s, -1) for s in out.scores], 1)
            .gather(-1, sequences[:, P:, None])
            .squeeze(-1)
        )
        completion_ids = sequences[:, P:]
    else:  # each prompt once, its 16 completions from copies of its keys and values
        prompt_ids, _, completion_ids, logprobs = sample(
            model, tokenizer, prompts, config, repeats=16, return_logprobs=True
        )
        assert torch.equal(prompt_ids, encoded["input_ids"])
    return (
        encoded["input_ids"],
        encoded["attention_mask"],
        completion_ids,
        logprobs.nan_to_num(neginf=-1e9),
        config,
    )


@pytest.mark.parametrize("script", RL_SCRIPTS, ids=lambda m: m.__name__)
def test_training_logprobs_equal_the_samplers_despite_the_models_own_settings(quirky_model, script):
    model, tokenizer, extra = quirky_model
    prompt_ids, prompt_mask, completion_ids, sampler, config = sampled_with_scores(model, tokenizer, 0.7)
    mask, _ = script.completion_mask_from(completion_ids, torch.tensor(config.eos_token_id))
    with torch.no_grad():
        trainer, _ = script.forward_logprobs(model, prompt_ids, prompt_mask, completion_ids, mask, 0.7)
    assert mask.sum() > 200 and ((trainer - sampler).abs() * mask).max() < 1e-5
    assert model.generation_config.repetition_penalty == 2.0  # never read by the sampler, never changed
    # the same check fails for generate left to fill in the model's repetition penalty and n-gram ban
    _, _, leaked, leaked_logprobs, _ = sampled_with_scores(model, tokenizer, 0.7, leak=True)
    mask, _ = script.completion_mask_from(leaked, torch.tensor(config.eos_token_id))
    with torch.no_grad():
        trainer, _ = script.forward_logprobs(model, prompt_ids, prompt_mask, leaked, mask, 0.7)
    assert ((trainer - leaked_logprobs).abs() * mask).max() > 0.1


@pytest.mark.parametrize("script", RL_SCRIPTS, ids=lambda m: m.__name__)
def test_a_completion_that_stops_on_the_models_second_eos_is_masked_through_it(quirky_model, script):
    model, tokenizer, extra = quirky_model
    _, _, completion_ids, _, config = sampled_with_scores(model, tokenizer, temperature=1.0)
    stop_ids = torch.tensor(config.eos_token_id)
    mask, truncated = script.completion_mask_from(completion_ids, stop_ids)
    stopped_on_extra = [
        i
        for i, row in enumerate(completion_ids.tolist())
        if extra in row and not set(row[: row.index(extra)]) & set(config.eos_token_id)
    ]
    assert stopped_on_extra, "the sample should contain a completion ending on the second EOS id"
    for i in stopped_on_extra:
        end = completion_ids[i].tolist().index(extra)
        assert mask[i].tolist() == [1.0] * (end + 1) + [0.0] * (completion_ids.shape[1] - end - 1)
        assert not truncated[i]
        assert (completion_ids[i, end + 1 :] == tokenizer.pad_token_id).all()  # generation stopped there too
    # by hand: stops on EOS (2) or the extra id, the padding after it is never an action
    ids = torch.tensor([[7, 8, extra, 0, 0], [7, 2, 9, 0, 0], [7, 8, 9, 10, 11]])
    mask, truncated = script.completion_mask_from(ids, stop_ids)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]] and truncated.tolist() == [
        False,
        False,
        True,
    ]


# ---- memory: log-probs a block of rows at a time -----------------------------------------------------------


def saved_for_backward(fn):
    """Run fn, recording (dtype, numel) of every tensor autograd keeps for backward (outside checkpoints)."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append((t.dtype, t.numel())) or t, lambda t: t
    ):
        out = fn()
    return out, saved


@pytest.mark.parametrize("script", [grpo, reinforce, ppo_rlhf, sft, dpo], ids=lambda m: m.__name__)
def test_token_logprobs_in_blocks_equal_one_pass_and_keep_no_fp32_copy(script, monkeypatch):
    torch.manual_seed(0)
    # (N, T, V), bf16 as under autocast
    logits = torch.randn(6, 5, 50, dtype=torch.bfloat16, requires_grad=True)
    tokens = torch.randint(0, 50, (6, 5))
    args = (0.7,) if script in RL_SCRIPTS else ()
    temperature = args[0] if args else 1.0
    reference = torch.log_softmax(logits.float() / temperature, -1).gather(-1, tokens[..., None]).squeeze(-1)
    (expected_grad,) = torch.autograd.grad((reference * torch.arange(5.0)).sum(), logits)
    monkeypatch.setattr(script, "LOGITS_PER_BLOCK", 2 * 5 * 50)  # blocks of 2 rows
    logprobs, saved = saved_for_backward(lambda: script.token_logprobs(logits, tokens, *args))
    (grad,) = torch.autograd.grad((logprobs * torch.arange(5.0)).sum(), logits)
    assert logprobs.dtype == torch.float32 and torch.allclose(logprobs, reference, atol=1e-6)
    assert torch.allclose(grad.float(), expected_grad.float(), atol=1e-3)
    assert max((n for dtype, n in saved if dtype == torch.float32), default=0) < logits.numel()
    _, saved_naive = saved_for_backward(
        lambda: torch.log_softmax(logits.float(), -1).gather(-1, tokens[..., None])
    )
    # what the blocks avoid
    assert max(n for dtype, n in saved_naive if dtype == torch.float32) == logits.numel()


@pytest.mark.parametrize("script", RL_SCRIPTS, ids=lambda m: m.__name__)
def test_entropy_in_blocks_equals_one_pass(script, monkeypatch):
    torch.manual_seed(0)
    logits = torch.randn(6, 5, 50)
    logp = torch.log_softmax(logits / 0.7, -1)
    monkeypatch.setattr(script, "LOGITS_PER_BLOCK", 2 * 5 * 50)
    assert torch.allclose(script.entropy(logits, 0.7), -(logp.exp() * logp).sum(-1), atol=1e-6)


# ---- mixed precision and gradient checkpointing in every script that trains --------------------------------

ONE_STEP = [grpo, reinforce, ppo_rlhf, sft, dpo, reward_model]  # each one step: conftest.run_one_step


def one_step(script, tmp_path, **overrides) -> dict:
    """The trained weights (fp32 tensors by name) after one step of `script`."""
    return saved_weights(f"{run_one_step(script, tmp_path, **overrides)}/model")


def painter_weights() -> dict:
    return saved_weights(PAINTER)


@pytest.mark.parametrize("script", ONE_STEP, ids=lambda m: m.__name__)
def test_one_bf16_step_at_lr_1e6_changes_the_trained_weights(script, tmp_path):
    after = one_step(script, tmp_path, dtype="bfloat16", learning_rate=1e-6)
    before = painter_weights()
    shared = [k for k in after if k in before]  # the reward model's new head has no painter counterpart
    assert len(shared) >= len(before) - 1 and all(
        after[k].dtype == torch.float32 for k in after
    )  # fp32 saved
    changed = sum(int((after[k] != before[k]).sum()) for k in shared) / sum(before[k].numel() for k in shared)
    if script not in (ppo_rlhf, reward_model):
        assert changed >= 0.99, changed
    else:
        # NOTE: some weights barely move in fp32 too. In PPO, Adam's eps of 1e-5 (SFD) shrinks the updates
        # of gradients below ~1e-8 under fp32's resolution (~91% change); the reward model has no softmax over
        # the vocabulary, so the embeddings of tokens not in the batch get no gradient (~55% change). There,
        # bf16 compute must lose none of the updates that fp32 compute makes, but for the few rows of tokens
        # that one run drew and the other did not (the inverse-CDF draw moves with the logits' rounding).
        fp32 = one_step(script, tmp_path / "fp32", dtype="float32", learning_rate=1e-6)
        moved = {k: fp32[k] != before[k] for k in shared}
        kept = sum(int((after[k] != before[k])[moved[k]].sum()) for k in shared) / sum(
            int(m.sum()) for m in moved.values()
        )
        assert changed > 0.5 and kept >= 0.97, (changed, kept)


def test_the_same_step_on_bf16_weights_rounds_away():
    """Why trained weights stay fp32: AdamW at lr 1e-6 on bf16 weights leaves almost all of them unchanged."""
    model, tokenizer = load_model_and_tokenizer()
    model = model.to(torch.bfloat16)
    before = copy.deepcopy(model.state_dict())
    ids = torch.tensor(
        [encode_prompt(tokenizer, PROMPT) + encode_completion(tokenizer, PROMPT, "Sunset Dust")]
    )
    model(ids, labels=ids).loss.backward()
    torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0).step()
    changed = sum(int((p != before[k]).sum()) for k, p in model.state_dict().items()) / sum(
        p.numel() for p in before.values()
    )
    assert changed < 0.05, changed


@pytest.mark.parametrize("script", ONE_STEP, ids=lambda m: m.__name__)
def test_gradient_checkpointing_gives_the_same_step(script, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    enabled, enable = [], PreTrainedModel.activation_checkpointing_enable
    monkeypatch.setattr(
        PreTrainedModel,
        "activation_checkpointing_enable",
        lambda self, *a, **k: enabled.append(type(self).__name__) or enable(self, *a, **k),
    )
    plain = one_step(script, tmp_path / "plain")
    assert not enabled
    checkpointed = one_step(script, tmp_path / "checkpointed", gradient_checkpointing=True)
    # every trained model: PPO's policy and value model
    assert len(enabled) == (2 if script is ppo_rlhf else 1)
    assert plain.keys() == checkpointed.keys()
    if script in (ppo_rlhf, sft):  # one completion per prompt: the same forward either way
        assert all(torch.allclose(plain[k], checkpointed[k], atol=1e-6) for k in plain)
        return
    # The same step up to fp32 rounding. Checkpointed layers keep no cache, so there the prompt runs once per
    # completion, not once per group or pair (common.completion_forward); the gradients agree to ~1e-5
    # (tests/test_common.py). Adam's first step is +-lr for any gradient well above its eps, so only weights
    # whose gradient is near 0 may move differently.
    diffs = torch.cat([(plain[k] - checkpointed[k]).abs().flatten() for k in plain])
    (args_file,) = (tmp_path / "plain").glob("*/args.json")  # the painter's learning rate, as resolved
    lr = json.load(open(args_file))["learning_rate"]
    assert (diffs > 1e-6).float().mean() < 0.01 and diffs.max() <= 2 * lr + 1e-6
    # it trained
    assert any(not torch.equal(plain[k], painter_weights()[k]) for k in plain if k in painter_weights())


# ---- the GPU check, on its small config --------------------------------------------------------------------


def test_the_gpu_check_runs_here_on_its_small_config(tmp_path):
    from conftest import run_script

    result = run_script(
        "tests/bench/gpu_check.py", "--small", "--out", str(tmp_path / "report.json"), timeout=600
    )
    with open(tmp_path / "report.json") as f:
        report = json.load(f)
    failed = {name: check["detail"] for name, check in report["checks"].items() if not check["passed"]}
    assert result.returncode == 0 and not failed, (failed, result.stderr[-3000:])
    assert set(report["checks"]) == {
        "talks like a trained model",
        "sampler vs trainer",
        "one bf16 step changes the weights",
        "step-0 KL in bf16",
        "gradient checkpointing lowers the peak",
        "resume grpo",
        "resume dpo",
        "LoRA in bf16",
    }
    # left padding, and a model that stops early, on its second EOS id too, with a trained model's entropy
    talks = report["talks"]
    assert len(talks["prompt_lengths"]) > 1 and talks["stopped_share"] >= 0.5
    assert talks["stops"]["<|endoftext|>"] > 0 and 0.5 <= talks["entropy_nats"] <= 4
    # on a CPU the fp32 sampler and trainer agree to rounding
    gap = report["sampler_trainer_gap"]
    assert gap["float32"]["max_abs"] < 1e-4 and gap["float32"]["tokens"] > 100
    assert gap["bfloat16"]["mean_abs"] < 0.05
    assert report["throughput_bf16"]["generated_tokens_per_s"] > 0
    scripts = report["scripts"]
    assert set(scripts) == {"sft", "reward_model", "dpo", "grpo", "reinforce", "ppo_rlhf"}
    for name, entry in scripts.items():
        assert entry["saved_dtype"] == "torch.float32" and entry["changed_share_layers"] >= 0.99, name
        # checkpointing lowers the peak of forward and backward
        assert entry["checkpointing"]["backward_mb"] < entry["plain"]["backward_mb"], name
        # before the first update the reference and the eval's starting copy compute what the policy does
        for variant in ("plain", "checkpointing"):
            values = entry[variant]["kl_at_start"]
            assert all(value == 0.0 for value in values.values()), (name, variant, values)
            assert len(values) == {"sft": 1, "reward_model": 0, "dpo": 3}.get(name, 2), (name, values)
    # the step-1 checkpoint resumed: step 2 and the final weights as in the unbroken run, bit for bit
    for name in ("grpo", "dpo"):
        resume = report["resume"][name]
        assert resume["rows_equal"] and resume["weights_max_abs_diff"] == 0.0
        assert resume["steps_compared"] == [2]
    # LoRA: the reference is the model with its adapters off; only the adapters train
    for name in ("grpo", "ppo_rlhf"):
        lora = report["lora"][name]
        assert lora["only_adapters"] and lora["lora_B_max"] > 0 and lora["adapter_tensors"] > 0, lora
        assert list(lora["kl_at_start"].values()) == [0.0, 0.0], lora
