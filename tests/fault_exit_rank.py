"""One rank of tests/test_faults.py::test_process_exits_after_stuck_peer, started as torchrun would
(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, EPLIB_TIMEOUT_S in the environment).

Rank 1 stops itself (SIGSTOP) for good before its dispatch. Rank 0 dispatches, times out, prints
"raised <unix time>" and returns from main without eplib.abort: the interpreter must then exit
although the abandoned collective is still pending in gloo (eplib's exit hook ends it).
"""

import datetime
import os
import signal
import time

import torch
import torch.distributed as dist

import eplib


def main() -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
    rank = dist.get_rank()
    buffer = eplib.Buffer(dist.group.WORLD)
    topk_idx = torch.tensor([[0], [1]])
    layout = buffer.get_dispatch_layout(topk_idx, 2)
    if rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP)
    try:
        buffer.dispatch(torch.ones(2, 4), num_tokens_per_rank=layout[0], is_token_in_rank=layout[3],
                        num_tokens_per_expert=layout[2], topk_idx=topk_idx, topk_weights=torch.ones(2, 1))
    except RuntimeError as error:
        print(f"raised {time.time()} {error}", flush=True)


if __name__ == "__main__":
    main()
