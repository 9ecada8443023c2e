"""The small shared part: the paint-colour task, judges, model loading, the sampler's settings, the eval,
and the plumbing of a run (process group, logger, checkpoints, one-line errors). No algorithm code."""

from transformers.utils import logging as _hf_logging

from .checkpoint import load_checkpoint, resumed_args, save_checkpoint
from .data import PROMPT, color_names, eval_prompts, judge_columns, load_prompts, read_jsonl
from .data import sample_colour_pairs, split_by_prompt, xkcd_names
from .evaluate import evaluate, frozen_copy, generate
from .judges import get_judge
from .models import PAINTER, autocast, completion_forward, encode_completion, encode_examples, encode_prompt
from .models import load_model_and_tokenizer, load_reward_model, resolve_device_dtype, sample, sampling_config
from .models import save_atomic, stop_token_ids
from .preferences import candidate_names, encode_pairs, load_pairs, pair_prompts, rank_pairs, read_preferences
from .run import Logger, all_gather, all_sum, cleanup_distributed, init_distributed, parse_args
from .run import sampling_seed, sync_gradients

_hf_logging.disable_progress_bar()
