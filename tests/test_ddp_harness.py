"""The multi-process test harness (tests/ddp.py) itself: a run that hangs fails with the stack of every thread of
every process (tests/stack_dumps/sitecustomize.py), so an intermittent hang in CI says where each rank waited."""
from __future__ import annotations

from pathlib import Path

import pytest

from ddp import run_ddp

SCRIPT = Path(__file__).resolve().parent / "scripts" / "ddp_collective_on_one_rank.py"


@pytest.mark.slow
def test_a_hung_run_fails_with_every_process_stack():
    with pytest.raises(AssertionError) as failure:
        run_ddp(SCRIPT, timeout=20)
    message = str(failure.value)
    assert "did not finish within 20 s" in message
    assert "STARTED rank 0" in message and "STARTED rank 1" in message
    # rank 0 in its wait, rank 1 inside the all-reduce, each with a faulthandler traceback
    assert 'in rank_zero_waits_for_nothing' in message
    assert 'in all_reduce' in message
