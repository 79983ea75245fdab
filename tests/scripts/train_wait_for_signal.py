"""`tokenizer/train.py` or `prior/train.py` (first argument: tokenizer | prior) whose process 0 stops in step
$LGQ_WAIT_AT_STEP, prints "WAITING <pid> <parent pid>" and waits (at most 120 s) until a real signal reaches it.

Used by the preemption tests: the parent sends SIGTERM or SIGUSR1 to that pid while the step is running (the
other processes of a 2-process run wait in the step's collectives, and get no signal at all).
"""
import os
import sys
import time

from common.training import Trainer

wait_step = int(os.environ["LGQ_WAIT_AT_STEP"])
original_steps = Trainer._optimizer_steps


def wait_for_signal_then_step(self, step):
    if step == wait_step and self.accelerator.process_index == 0:
        print(f"WAITING {os.getpid()} {os.getppid()}", flush=True)
        deadline = time.monotonic() + 120
        while self.stop_signal is None and time.monotonic() < deadline:
            time.sleep(0.01)
    return original_steps(self, step)


Trainer._optimizer_steps = wait_for_signal_then_step
if __name__ == "__main__":
    if sys.argv[1] == "tokenizer":
        from tokenizer.train import main
    else:
        from prior.train import main
    main(sys.argv[2:])
