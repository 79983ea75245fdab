"""The multi-process test harness (tests/ddp.py) itself: a run that hangs fails with the stack of every thread of
every process (tests/stack_dumps/sitecustomize.py), so an intermittent hang in CI says where each rank waited."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ddp import STACK_DUMPS, run_ddp

SCRIPT = Path(__file__).resolve().parent / "scripts" / "ddp_collective_on_one_rank.py"


def stacks_by_rank(message: str) -> dict[str, str]:
    """{RANK value: that process's stack section} from the harness's "--- threads of pid P (RANK=R): ..." sections."""
    sections = re.split(r"^--- threads of pid \d+ \(RANK=", message, flags=re.MULTILINE)[1:]
    return {section.split(")", 1)[0]: section for section in sections}


@pytest.mark.slow
def test_a_hung_run_fails_with_every_process_stack():
    with pytest.raises(AssertionError) as failure:
        run_ddp(SCRIPT, timeout=20)
    message = str(failure.value)
    assert "did not finish within 20 s" in message, message
    assert "STARTED rank 0" in message and "STARTED rank 1" in message, message
    # one whole section per process (they dump at the same moment; into one pipe they would interleave mid-line):
    # rank 0 in its wait, rank 1 inside the all-reduce, the launcher (no RANK) in torch elastic's monitor loop
    stacks = stacks_by_rank(message)
    assert set(stacks) == {"0", "1", "-"}, message
    assert re.search(r'^  File ".*ddp_collective_on_one_rank.py", line \d+ in rank_zero_waits_for_nothing$',
                     stacks["0"], flags=re.MULTILINE), message
    assert re.search(r'^  File ".*distributed_c10d.py", line \d+ in all_reduce$', stacks["1"], flags=re.MULTILINE), message
    assert "in rank_zero_waits_for_nothing" not in stacks["1"] and "in all_reduce" not in stacks["0"], message
    assert re.search(r"^  File .*torch/distributed/run.py", stacks["-"], flags=re.MULTILINE), message


def test_the_stack_dump_hook_still_runs_the_sitecustomize_it_shadows(tmp_path):
    (tmp_path / "sitecustomize.py").write_text("import builtins\nbuiltins.OTHER_SITECUSTOMIZE_RAN = True\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(STACK_DUMPS), str(tmp_path)])}
    code = ("import builtins, sitecustomize; "
            "print(sitecustomize.__file__, getattr(builtins, 'OTHER_SITECUSTOMIZE_RAN', False))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.split()
    assert Path(out[0]).parent == STACK_DUMPS and out[1] == "True"
