"""The TRL side of compare_trl.py: one training run of one TRL trainer, as a user would write it.

python tests/bench/trl_runner.py SPEC.json   (compare_trl.py writes the spec and reads SPEC_DIR/trl_run.json)

The spec names the method, the TRL config fields (already mapped from the shared settings by compare_trl.py),
the data files and the judge. This file adds no algorithm: it builds the trainer, times every step with a
TrainerCallback, saves the model and dumps the EFFECTIVE config (after the config's and the trainer's own
__post_init__/__init__ adjustments) so that compare_trl.py can check it against ours.
"""
import time

T_IMPORT = time.time()  # before torch/transformers/trl are imported: the process has just started
import dataclasses
import json
import os
import sys

import torch

spec = json.load(open(sys.argv[1]))
torch.set_num_threads(spec["threads"])  # OMP_NUM_THREADS is set too, by compare_trl.py
sys.path.insert(0, spec["repo"])
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback  # noqa: E402

from common.task import get_judge  # noqa: E402


class StepTimer(TrainerCallback):
    """Wall-clock time of every optimiser step. HF-Trainer-based trainers call on_step_begin/on_step_end around
    one optimiser step (generation included for GRPO/RLOO); PPOTrainer (trl 1.12) has its own loop that calls
    only on_train_begin and on_step_end, so there a step is the time between two on_step_end calls."""
    def __init__(self):
        self.train_begin, self.begin, self.end, self.cpu_end = None, [], [], []

    def on_train_begin(self, args, state, control, **kwargs):
        self.train_begin = time.time()

    def on_step_begin(self, args, state, control, **kwargs):
        self.begin.append(time.time())

    def on_step_end(self, args, state, control, **kwargs):
        self.end.append(time.time())
        self.cpu_end.append(time.process_time())  # CPU seconds of the whole process (all threads)


def rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


method, model_path, out = spec["method"], spec["model"], spec["out"]
tokenizer = AutoTokenizer.from_pretrained(model_path)
timer = StepTimer()
common_kwargs = dict(output_dir=os.path.join(out, "trainer"), report_to="none", save_strategy="no",
                     disable_tqdm=True, seed=spec["seed"])
facts = {}  # settings that are not config fields, read from the trainer after it is built
if method == "ppo":  # trl 1.12: PPOTrainer lives in trl.experimental.ppo (removed from trl 1.16)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.ppo import PPOConfig as Config, PPOTrainer
    config = Config(**common_kwargs, **spec["config"])
    policy = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    ref_policy = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    # the reward model trained by our reward_model.py; the value model starts from it (TRL examples/scripts/ppo/ppo.py)
    reward_model = AutoModelForSequenceClassification.from_pretrained(spec["reward_model"], num_labels=1, dtype=torch.float32)
    value_model = AutoModelForSequenceClassification.from_pretrained(spec["reward_model"], num_labels=1, dtype=torch.float32)
    dataset = Dataset.from_list(rows(spec["prompts"]))  # tokenized as TRL's examples/scripts/ppo/ppo.py does
    dataset = dataset.map(lambda x: {"input_ids": tokenizer(x["prompt"])["input_ids"]}, remove_columns=["prompt"])
    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=ref_policy,
                         reward_model=reward_model, value_model=value_model, train_dataset=dataset,
                         eval_dataset=dataset.select(range(8)), callbacks=[timer])
    facts["stop_is_eos"] = trainer.stop_token_id == tokenizer.eos_token_id
else:
    import trl
    if method in ("grpo", "rloo"):
        Config, Trainer = {"grpo": (trl.GRPOConfig, trl.GRPOTrainer), "rloo": (trl.RLOOConfig, trl.RLOOTrainer)}[method]
        judge = get_judge(spec["judge"], "cpu")  # TRL's reward-function signature: judge(prompts, completions, **kw)
        trainer = Trainer(model=model_path, reward_funcs=[judge], args=Config(**common_kwargs, **spec["config"]),
                          train_dataset=Dataset.from_list(rows(spec["prompts"])), processing_class=tokenizer,
                          callbacks=[timer])
        facts["judge"] = "+".join(f.__name__ for f in trainer.reward_funcs)
    else:
        Config, Trainer = {"sft": (trl.SFTConfig, trl.SFTTrainer), "dpo": (trl.DPOConfig, trl.DPOTrainer),
                           "rm": (trl.RewardConfig, trl.RewardTrainer)}[method]
        model = model_path
        if method == "rm":
            # NOTE: a causal-LM checkpoint gets a fresh scalar head; HF initialises it N(0, initializer_range=0.02),
            # reward_model.py N(0, 1/sqrt(d+1)) (SFD). TRL has no setting for it, so the head is set here.
            torch.manual_seed(spec["seed"])
            model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1, dtype=torch.float32)
            torch.nn.init.normal_(model.score.weight, std=spec["head_init_std"])
            facts["head_init_std"] = spec["head_init_std"]
        trainer = Trainer(model=model, args=Config(**common_kwargs, **spec["config"]), processing_class=tokenizer,
                          train_dataset=Dataset.from_list(rows(spec["data"])), callbacks=[timer])
        first = trainer.train_dataset[0]  # the token ids TRL trains on, to compare with ours
        facts["first_example_ids"] = {k: first[k] for k in ("input_ids", "labels", "prompt_ids", "chosen_ids",
                                                              "rejected_ids") if k in first}
    # which parameters get weight decay (HF: all but biases and norms; ours: matrices only)
    names = dict(trainer.model.named_parameters())  # NOTE: the tied lm_head.weight is listed once, as embed_tokens
    decayed = set(trainer.get_decay_parameter_names(trainer.model)) & set(names)
    facts["decay_matrices_only"] = decayed == {n for n, p in names.items() if p.dim() >= 2}

# the fields we set that differ from the config class's defaults (the dataclass defaults: a default TRL config
# does not even build on a CPU-only machine, bf16=None becomes True and fails)
defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory() for f in dataclasses.fields(Config)}
plain = lambda v: getattr(v, "value", v)  # enums (lr_scheduler_type) to their string
explicit = {k: [plain(defaults[k]), v] for k, v in spec["config"].items() if plain(defaults[k]) != v}
model_for_facts = trainer.model.policy if method == "ppo" else trainer.model
facts["dtype"] = str(next(model_for_facts.parameters()).dtype).replace("torch.", "")
facts["dropout"] = max([m.p for m in model_for_facts.modules() if isinstance(m, torch.nn.Dropout)] +
                       [float(getattr(model_for_facts.config, "attention_dropout", 0.0))])
facts["gradient_checkpointing"] = bool(getattr(model_for_facts, "is_gradient_checkpointing", False))

trainer.train()
t_done = time.time()
trainer.save_model(os.path.join(out, "model"))
tokenizer.save_pretrained(os.path.join(out, "model"))
with open(os.path.join(out, "trl_run.json"), "w") as f:
    json.dump({"t_import": T_IMPORT, "t_train_begin": timer.train_begin, "step_begin": timer.begin,
               "step_end": timer.end, "cpu_step_end": timer.cpu_end, "t_done": t_done, "config": trainer.args.to_dict(), "facts": facts, "explicit": explicit,
               "trl_version": __import__("trl").__version__}, f, default=str)
print("done", flush=True)  # a last stdout line, after saving: compare_trl.py reads the peak RSS (VmHWM) there
