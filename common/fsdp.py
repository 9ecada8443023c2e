"""FSDP2 for --fsdp under torchrun (common/run.py imports it then): PyTorch's fully_shard, each rank holding
1/k of every weight, gradient and Adam moment. A copied file may leave this module out.

A unit (each decoder layer; a scalar head; the root: embeddings, final norm, output layer) is all-gathered
just before its forward and backward and freed after; gradients are reduce-scattered, averaged over the
ranks as DDP averages them. Parameters are gathered in the compute dtype (bf16 on a GPU) and gradients
reduced in fp32 (MixedPrecisionPolicy); the shards, which the optimizer updates, stay fp32 master weights.
Every rank must run the same forwards: the scripts evaluate on all ranks under --fsdp, and the sampler keeps
the layers gathered for all its new tokens (gathered, below)."""

import contextlib

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict
from torch.distributed.checkpoint.state_dict import set_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard


def shard(model, dtype: torch.dtype):
    """model sharded in place over the process group: each decoder layer (the classes transformers names in
    _no_split_modules) its own unit, a scalar head (`score`) its own, the rest the root's."""
    policy = MixedPrecisionPolicy(param_dtype=None if dtype == torch.float32 else dtype,
                                  reduce_dtype=torch.float32)  # fmt: skip
    layers = set(getattr(model, "_no_split_modules", None) or [])
    for module in model.modules():
        if type(module).__name__ in layers:
            fully_shard(module, mp_policy=policy)
    if isinstance(getattr(model, "score", None), torch.nn.Module):
        fully_shard(model.score, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


@contextlib.contextmanager
def gathered(model):
    """Each unit gathered at its first forward and kept until the block ends, then freed: the sampler's one-
    token forwards gather nothing more (by default every unit would be re-gathered at every new token), and
    ranks whose completions stop at different lengths need not run the same number of forwards."""
    model.set_reshard_after_forward(False)
    try:
        yield
    finally:
        model.set_reshard_after_forward(True)
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()


def full_state_dict(model) -> dict:
    """The whole model's weights on rank 0's host (a collective: every rank calls it; others get {}), tied
    weights once (as save_pretrained writes them)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    for tied in getattr(model, "all_tied_weights_keys", None) or {}:
        state.pop(tied, None)
    return state


def save_sharded(models: dict, optimizer, folder: str) -> None:
    """A resume checkpoint: every rank writes its shards of the models and the optimizer state
    (torch.distributed.checkpoint), and rank 0 the metadata, into `folder`."""
    weights, optimizer_state = get_state_dict(torch.nn.ModuleDict(models), optimizer)
    dcp.save({"models": weights, "optimizer": optimizer_state}, checkpoint_id=folder)


def load_sharded(models: dict, optimizer, folder: str) -> None:
    """save_sharded's checkpoint back into the sharded models and the optimizer, in place."""
    modules = torch.nn.ModuleDict(models)
    weights, optimizer_state = get_state_dict(modules, optimizer)
    state = {"models": weights, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=folder)
    set_state_dict(modules, optimizer, model_state_dict=state["models"], optim_state_dict=state["optimizer"])
