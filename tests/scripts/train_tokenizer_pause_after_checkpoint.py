"""`tokenizer/train.py` that sleeps right after saving the checkpoint of step $LGQ_PAUSE_AFTER_STEP.

Used by the SIGKILL test: the parent waits for the "PAUSED" line, kills this process with SIGKILL
(it dies between two steps, like a preempted job) and resumes the run with `--resume latest`.
"""
import os
import sys
import time

from common.training import Trainer
from tokenizer.train import main

pause_step = int(os.environ["LGQ_PAUSE_AFTER_STEP"])
original_save = Trainer.save_checkpoint


def save_then_pause(self):
    path = original_save(self)
    if self.step == pause_step:
        print("PAUSED", path, flush=True)
        time.sleep(600)
    return path


Trainer.save_checkpoint = save_then_pause
main(sys.argv[1:])
