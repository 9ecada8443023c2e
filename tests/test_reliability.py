"""What a user of a Qwen- or Llama-sized model on a GPU would hit, checked on the painter and small local
models: gradient checkpointing that recomputes, a reference that computes what the policy computed, one fp32
block of the entropy at a time, learning rates that fit the model, and bad input named as such."""

import json
import weakref

import pytest
import torch
from local_models import chatml_tokenizer, save_random_model

import dpo
import grpo
import ppo_rlhf
import reinforce
import reward_model
import sft
from common.models import load_model_and_tokenizer, sampling_config
from common.run import Run
from conftest import assert_one_line_error, read_jsonl, run_one_step, run_script

ONE_STEP = [grpo, reinforce, ppo_rlhf, sft, dpo, reward_model]  # each one step: conftest.run_one_step


# ---- gradient checkpointing really recomputes ----------------------------------------------------------


def count_mlp_calls(monkeypatch) -> dict:
    """Counts the painter's MLP calls: in a training forward (gradient enabled), and in backward (the
    recomputation of a checkpointed layer). NOTE: the forward is wrapped, not hooked: module hooks do not run
    in a checkpoint's recompute."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    calls, forward, backward = {"forward": 0, "backward": 0}, LlamaMLP.forward, torch.Tensor.backward
    in_backward = [False]

    def counting_forward(self, *args, **kwargs):
        if in_backward[0]:
            calls["backward"] += 1
        elif torch.is_grad_enabled():
            calls["forward"] += 1
        return forward(self, *args, **kwargs)

    def flagged_backward(*args, **kwargs):
        in_backward[0] = True
        try:
            return backward(*args, **kwargs)
        finally:
            in_backward[0] = False

    monkeypatch.setattr(LlamaMLP, "forward", counting_forward)
    monkeypatch.setattr(torch.Tensor, "backward", flagged_backward)
    return calls


@pytest.mark.parametrize("script", ONE_STEP, ids=lambda m: m.__name__)
def test_gradient_checkpointing_recomputes_each_layer_in_backward(script, tmp_path, monkeypatch):
    calls = count_mlp_calls(monkeypatch)
    run_one_step(script, tmp_path / "plain")
    assert calls["forward"] > 0 and calls["backward"] == 0
    calls.update(forward=0, backward=0)
    run_one_step(script, tmp_path / "checkpointed", gradient_checkpointing=True)
    # each training forward runs the layer once more in backward (transformers recomputes in train mode only)
    assert calls["forward"] > 0 and calls["backward"] == calls["forward"], calls


# ---- the reference computes what the policy computed -----------------------------------------------------


@pytest.mark.parametrize("script", [grpo, reinforce, ppo_rlhf], ids=lambda m: m.__name__)
@pytest.mark.parametrize("beta", [0.04, 0.0])
def test_no_kl_before_the_first_update_in_bf16(script, beta, tmp_path):
    flags = dict(dtype="bfloat16", device="cpu", **({"beta": beta} if script is not ppo_rlhf else {}))
    if script is ppo_rlhf and beta == 0.0:
        flags["kl_coef"] = 0.0
    run_dir = run_one_step(script, tmp_path, **flags)
    rows = read_jsonl(f"{run_dir}/metrics.jsonl")
    assert rows[0]["step"] == 0 and rows[0]["eval/kl"] == 0.0  # the eval's starting copy, on the host
    if beta > 0:  # the reference's log-probs at step 1, before the update, in the loss
        assert rows[1]["step"] == 1 and rows[1]["train/kl"] == 0.0


@pytest.mark.parametrize("script", [dpo, sft], ids=lambda m: m.__name__)
def test_no_drift_before_the_first_update_in_bf16(script, tmp_path):
    run_dir = run_one_step(script, tmp_path, dtype="bfloat16", device="cpu")
    rows = read_jsonl(f"{run_dir}/metrics.jsonl")
    assert rows[0]["step"] == 0 and rows[0]["eval/kl"] == 0.0
    if script is dpo:  # the implicit rewards beta (log pi - log pi_ref) of step 1, before its update
        assert rows[1]["rewards/chosen"] == 0.0 and rows[1]["rewards/rejected"] == 0.0


# ---- the entropy holds one fp32 block at a time ------------------------------------------------------------


@pytest.mark.parametrize("script", [grpo, reinforce, ppo_rlhf], ids=lambda m: m.__name__)
def test_the_entropy_frees_each_fp32_block_before_the_next(script, monkeypatch):
    logits = torch.randn(6, 5, 50, dtype=torch.bfloat16)
    alive, most, log_softmax = [], [0], torch.log_softmax

    def tracked(*args, **kwargs):  # how many earlier blocks' log-softmax still exist when one more is made
        out = log_softmax(*args, **kwargs)
        most[0] = max(most[0], sum(ref() is not None for ref in alive))
        alive.append(weakref.ref(out))
        return out

    monkeypatch.setattr(script, "LOGITS_PER_BLOCK", 2 * 5 * 50)  # blocks of 2 rows: 3 blocks
    monkeypatch.setattr(torch, "log_softmax", tracked)
    script.entropy(logits, 0.7)
    assert len(alive) == 3 and most[0] == 0


# ---- learning rates that fit the model ------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    return save_random_model(str(path), chatml_tokenizer())


@pytest.mark.parametrize(
    "script, painter, other",
    [
        (sft, 5e-3, 2e-5),
        (reward_model, 1e-3, 1e-5),
        (dpo, 5e-4, 1e-6),
        (grpo, 1e-3, 1e-6),
        (reinforce, 2e-4, 1e-6),
        (ppo_rlhf, 2e-4, 3e-6),
    ],  # fmt: skip
    ids=lambda x: getattr(x, "__name__", ""),
)
def test_the_default_learning_rate_is_the_painters_or_trls(
    script, painter, other, local_model, tmp_path, capsys, monkeypatch
):
    assert script.Args.learning_rate is None
    passed = []

    class Stop(Exception):
        pass

    def recording_run(name, args, seed_per_rank=False, learning_rate=None):
        passed.append(learning_rate)
        raise Stop

    monkeypatch.setattr(script, "Run", recording_run)
    with pytest.raises(Stop):
        script.main(script.Args(output_dir=str(tmp_path)))
    assert passed == [(painter, other)]  # what the script gives the run, which resolves it:
    for model, expected in [(None, painter), (local_model, other)]:
        run = Run(script.__name__, script.Args(model=model, output_dir=str(tmp_path / str(expected))),
                  learning_rate=(painter, other))  # fmt: skip
        assert run.args.learning_rate == expected
        first_line = capsys.readouterr().out.splitlines()[0]
        assert f"--learning-rate {expected}" in first_line, first_line
    given = script.Args(model=local_model, learning_rate=0.5, output_dir=str(tmp_path / "given"))
    assert Run(script.__name__, given, learning_rate=(painter, other)).args.learning_rate == 0.5


def test_a_resumed_run_keeps_its_learning_rate(local_model, tmp_path):
    args = grpo.Args(model=local_model, output_dir=str(tmp_path), judge="correct", total_steps=1,
                     batch_size=2, group_size=2, eval_size=2, max_new_tokens=2)  # fmt: skip
    run_dir = grpo.main(args)["run_dir"]
    assert json.load(open(f"{run_dir}/args.json"))["learning_rate"] == 1e-6
    run = Run("grpo", grpo.Args(resume=run_dir), learning_rate=(1e-3, 1e-6))
    assert run.args.learning_rate == 1e-6 and run.args.model == local_model


# ---- memory the user sized: DPO's no-grad passes ----------------------------------------------------------


def test_dpo_no_grad_passes_hold_no_more_pairs_than_a_batch(tmp_path, monkeypatch):
    sizes, batch_logprobs = [], dpo.batch_logprobs
    monkeypatch.setattr(
        dpo, "batch_logprobs", lambda m, pairs, *a: sizes.append(len(pairs)) or batch_logprobs(m, pairs, *a)
    )
    run_one_step(dpo, tmp_path, batch_size=4, precompute_ref_logps=True, eval_pairs=12)
    assert sizes and max(sizes) == 4


# ---- bad input, named --------------------------------------------------------------------------------------


def test_a_temperature_of_zero_or_below_is_refused(painter):
    model, tokenizer = painter
    for temperature in (0.0, -1.0):
        with pytest.raises(ValueError, match="--temperature"):
            sampling_config(tokenizer, model, temperature, 8)
    result = run_script("grpo.py", "--temperature", "0", "--total-steps", "1")
    assert_one_line_error(result, "--temperature 0.0")


def test_a_folder_without_a_model_is_named(tmp_path):
    (tmp_path / "notes.txt").write_text("no model here")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_model_and_tokenizer(str(tmp_path))


def test_sft_runs_on_a_config_without_max_position_embeddings(tmp_path, monkeypatch):
    load, load_examples, loaded = sft.load_model_and_tokenizer, sft.load_examples, []

    def missing(config):
        raise AttributeError("max_position_embeddings")

    def without_context(*args, **kwargs):  # as a config without the field (Gemma-3's top-level one) reads
        model, tokenizer = load(*args, **kwargs)
        config_class = type(model.config)
        fields = {"max_position_embeddings": property(missing)}
        model.config.__class__ = type("NoContext", (config_class,), fields)
        loaded.append((model.config, config_class))
        return model, tokenizer

    def restored_then_load_examples(*args, **kwargs):  # sft reads the context in between; then save works
        config, config_class = loaded[0]
        config.__class__ = config_class
        return load_examples(*args, **kwargs)

    monkeypatch.setattr(sft, "load_model_and_tokenizer", without_context)
    monkeypatch.setattr(sft, "load_examples", restored_then_load_examples)
    run_one_step(sft, tmp_path)


def test_the_value_forward_builds_no_kv_cache(painter):
    value_model = load_model_and_tokenizer(scalar_head=True)[0]
    seen, forward = [], value_model.forward
    value_model.forward = lambda *a, **k: seen.append(k.get("use_cache")) or forward(*a, **k)
    ids = torch.tensor([[1, 5, 6, 7]])
    ppo_rlhf.forward_values(value_model, ids, torch.ones_like(ids), n_prompt=2)
    assert seen == [False]


def test_dpo_with_data_evaluates_the_held_out_pairs_prompts(tmp_path):
    from conftest import write_jsonl

    pairs = [{"prompt": f"Name this paint color: #0000{i:02x}", "chosen": "Navy Blue", "rejected": "Red"}
             for i in range(12)]  # fmt: skip
    train = write_jsonl(tmp_path / "train.jsonl", pairs[:8])
    heldout = write_jsonl(tmp_path / "heldout.jsonl", pairs[8:])
    run_dir = run_one_step(dpo, tmp_path, data=train, eval_data=heldout, batch_size=4)
    prompts = {row["prompt"] for row in read_jsonl(f"{run_dir}/samples.jsonl")}
    assert prompts == {pair["prompt"] for pair in pairs[8:]}


# ---- the README's commands parse as pasted -------------------------------------------------------------


def readme_commands() -> list[tuple[str, list[str]]]:
    """(script, flags) of every `python <script>.py ...` or `torchrun ... <script>.py ...` in README.md."""
    import os
    import re
    import shlex

    from conftest import ROOT

    text = open(os.path.join(ROOT, "README.md")).read()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for command in line.split("&&"):
                words = shlex.split(command, comments=True)
                scripts = [i for i, w in enumerate(words) if w in {f"{s.__name__}.py" for s in ONE_STEP}]
                if scripts and words[0] in ("python", "torchrun"):
                    commands.append((words[scripts[0]][:-3], words[scripts[0] + 1 :]))
    return commands


def test_every_readme_command_parses_as_pasted():
    import tyro

    commands = readme_commands()
    assert len(commands) >= 20 and any("Qwen/Qwen2.5-0.5B-Instruct" in flags for _, flags in commands)
    scripts = {s.__name__: s for s in ONE_STEP}
    for name, flags in commands:
        try:
            tyro.cli(scripts[name].Args, args=flags)
        except SystemExit:
            pytest.fail(f"README: {name}.py {' '.join(flags)} does not parse")


# ---- a collapse is announced -----------------------------------------------------------------------------


@pytest.mark.parametrize("script, overrides, fixes", [
    (grpo, {}, "with a --beta above 0.1, a lower --learning-rate"),
    (grpo, {"scale_rewards": "group", "beta": 0.0}, "with --scale-rewards none, a --beta above 0.0, a lower"),
    (dpo, {}, "with a --beta above 0.1, a lower --learning-rate"),
    (ppo_rlhf, {}, "with a --kl-coef above 0.05, a lower --learning-rate"),
    (sft, {}, "with a lower --learning-rate")])  # fmt: skip
def test_an_eval_whose_names_collapse_says_so_on_one_line(script, overrides, fixes, tmp_path, capsys,
                                                          monkeypatch):
    """Distinct names below 0.8 of the eval (which any fall of more than 0.2 from all distinct is): one line
    with the commonest name and how many prompts it answers; 0.8 and above: nothing."""
    run = Run(script.__name__, script.Args(output_dir=str(tmp_path), **overrides))
    names = iter([[f"Name {i}" for i in range(10)], ["Poop"] * 3 + [f"Name {i}" for i in range(7)],
                  ["Poop"] * 4 + ["Dust"] * 2 + [f"Name {i}" for i in range(4)]])  # distinct 1.0, 0.8, 0.6

    def run_eval():
        batch = next(names)
        samples = [{"prompt": f"#{i:06x}", "completion": n, "reward": 0.0} for i, n in enumerate(batch)]
        return {"eval/reward": 0.0, "eval/distinct": len(set(batch)) / len(batch)}, samples

    monkeypatch.setattr("common.run.save_atomic", lambda *args, **kwargs: None)
    collapses = []
    for step in (0, 1, 2):
        run.begin({"model": None}, None, None, run_eval) if step == 0 else run.evaluate(step)
        out = capsys.readouterr().out.splitlines()
        collapses.append([line for line in out if line.startswith("collapse:")])
    assert collapses[:2] == [[], []]  # 1.0, then 0.8: not a collapse
    (line,) = collapses[2]
    assert "60% distinct names, 'Poop' answers 4 of 10 eval prompts" in line and "reward hacking" in line
    assert fixes in line, line


def test_a_task_whose_right_answers_repeat_is_no_collapse_until_below_theirs(tmp_path, capsys, monkeypatch):
    """Basic colour terms: 64 hexes have about 11 right answers, so 'Grey' for 16 of them is right, not a
    hack. The eval reports the answers' own share of distinct ones; the line comes below 0.8 of it."""
    from common.models import load_model_and_tokenizer as load
    from common.task import evaluate, get_judge

    model, tokenizer = load()
    rows = [{"prompt": f"Name this paint color: #{i:02x}{i:02x}{i:02x}", "answer": ["White", "Grey"][i % 2]}
            for i in range(10)]  # fmt: skip
    metrics, _ = evaluate(model, tokenizer, get_judge("answer"), rows)
    assert metrics["eval/distinct_answers"] == 0.2
    plain = [{"prompt": row["prompt"]} for row in rows]
    assert "eval/distinct_answers" not in evaluate(model, tokenizer, get_judge("correct"), plain)[0]
    run = Run("grpo", grpo.Args(output_dir=str(tmp_path)))
    shares = iter([1.0, 0.3, 0.15])  # against the answers' 0.25: fine, fine, a collapse

    def run_eval():
        share = next(shares)
        names = [f"Name {i}" for i in range(round(20 * share))] + ["Grey"] * (20 - round(20 * share))
        samples = [{"prompt": "#", "completion": name} for name in names]
        return {"eval/distinct": share, "eval/distinct_answers": 0.25}, samples

    monkeypatch.setattr("common.run.save_atomic", lambda *args, **kwargs: None)
    lines = []
    for step in (0, 1, 2):
        run.begin({"model": None}, None, None, run_eval) if step == 0 else run.evaluate(step)
        lines.append([line for line in capsys.readouterr().out.splitlines() if line.startswith("collapse:")])
    assert lines[:2] == [[], []] and len(lines[2]) == 1 and "'Grey' answers 17 of 20" in lines[2][0]
