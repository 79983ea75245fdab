"""Run `tokenizer.prune` under accelerate and check the world size the test expects (EXPECT_WORLD_SIZE)."""
import os
import sys

from tokenizer.prune import main

if __name__ == "__main__":
    report = main(sys.argv[1:])
    expected = int(os.environ.get("EXPECT_WORLD_SIZE", "1"))
    assert report["num_processes"] == expected, f"expected {expected} processes, got {report['num_processes']}"
