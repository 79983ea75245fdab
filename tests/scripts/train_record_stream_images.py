"""`python train_record_stream_images.py <tokenizer/train.py args>` with LGQ_IMAGES_RECORD=<folder>: run the
tokenizer's training and write <folder>/rank_<r>.json, the index (tests/test_data_sources.index_of) of every image
of every micro-batch process r trained on, in order."""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: index_of

from common.training import Trainer  # noqa: E402
from test_data_sources import index_of  # noqa: E402
from tokenizer.train import main  # noqa: E402

original_fit, original_end = Trainer.fit, Trainer.end
seen: list[int] = []


def recording_fit(trainer, training_step, *args, **kwargs):
    def step(batch, step_index):
        seen.extend(index_of(image) for image in batch[0].cpu())
        return training_step(batch, step_index)

    return original_fit(trainer, step, *args, **kwargs)


def write_then_end(trainer):
    folder = Path(os.environ["LGQ_IMAGES_RECORD"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank_{trainer.accelerator.process_index}.json").write_text(json.dumps(seen))
    original_end(trainer)


Trainer.fit, Trainer.end = recording_fit, write_then_end
main(sys.argv[1:])
