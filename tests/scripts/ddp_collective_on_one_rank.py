"""A deliberately hung 2-process run (tests/test_ddp_harness.py): rank 1 waits in an all-reduce that rank 0 never
reaches (rank 0 waits for a file that never appears)."""
import os
import time

import torch
import torch.distributed as dist


def rank_zero_waits_for_nothing() -> None:
    while not os.path.exists("/nonexistent/never"):
        time.sleep(0.2)


def main() -> None:
    dist.init_process_group("gloo")
    print(f"STARTED rank {dist.get_rank()}", flush=True)
    if dist.get_rank() == 0:
        rank_zero_waits_for_nothing()
    else:
        dist.all_reduce(torch.ones(1))


if __name__ == "__main__":
    main()
