"""Run `prior.extract` under accelerate and check the world size the test expects (EXPECT_WORLD_SIZE)."""
import os
import sys

from prior.extract import main

if __name__ == "__main__":
    meta = main(sys.argv[1:])
    expected = int(os.environ.get("EXPECT_WORLD_SIZE", "1"))
    assert meta["num_processes"] == expected, f"expected {expected} processes, got {meta['num_processes']}"
