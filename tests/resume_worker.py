"""Runs an algorithm script's main() and kills the process right after the checkpoint of step --stop-after,
as a crash would (tests/test_ddp.py, under torchrun: every rank dies at the same point).

    python -m torch.distributed.run --nproc_per_node 2 tests/resume_worker.py grpo 2 --total-steps 4 ...
"""

import importlib
import os
import sys

import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":
    from common.run import Run

    module, stop_after = importlib.import_module(sys.argv[1]), int(sys.argv[2])
    save = Run.save_checkpoint

    def save_then_die(run, step, state):
        save(run, step, state)
        if step == stop_after:
            os._exit(3)

    Run.save_checkpoint = save_then_die
    module.main(tyro.cli(module.Args, args=sys.argv[3:]))
