"""Under `torchrun --nproc_per_node 2`: the painter sharded with FSDP2 samples (common.models.sample) what the
whole model samples, gathering each unit once, while the ranks' completions stop at different lengths
(tests/test_fsdp.py). Prints one JSON line per rank: the all-gathers counted, the units, the samples equal."""

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp._fully_shard import _fsdp_param_group

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.fsdp import shard  # noqa: E402
from common.models import load_model_and_tokenizer, sample, sampling_config  # noqa: E402

if __name__ == "__main__":
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model, tokenizer = load_model_and_tokenizer()
    prompts = [f"Name this paint color: #{rank * 40 + i:02x}{i * 30:02x}80" for i in range(1 + 3 * rank)]
    config = sampling_config(tokenizer, model, 1.0, int(sys.argv[1]))
    torch.manual_seed(int(sys.argv[2]) + rank)
    whole = sample(model, tokenizer, prompts, config, repeats=1 + 2 * rank)[2]
    shard(model, torch.float32)
    gathers, gather = [0], _fsdp_param_group.foreach_all_gather

    def counted(*args, **kwargs):
        gathers[0] += 1
        return gather(*args, **kwargs)

    _fsdp_param_group.foreach_all_gather = counted
    torch.manual_seed(int(sys.argv[2]) + rank)
    sharded = sample(model, tokenizer, prompts, config, repeats=1 + 2 * rank)[2]
    units = sum(isinstance(m, FSDPModule) for m in model.modules())
    freed = all(not m._get_fsdp_state()._fsdp_param_group.is_unsharded for m in model.modules()
                if isinstance(m, FSDPModule) and m._get_fsdp_state()._fsdp_param_group)  # fmt: skip
    print(json.dumps(dict(rank=rank, gathers=gathers[0], units=units, same=torch.equal(whole, sharded),
                          length=sharded.shape[1], freed=freed)))  # fmt: skip
    dist.destroy_process_group()
