"""Imported at start-up by every Python process the multi-process tests launch (tests/ddp.py puts this folder on
PYTHONPATH; DataLoader workers inherit it through fork): SIGUSR2 writes the stack of every thread of the process;
then the sitecustomize it shadows (further on sys.path), if any, runs as it would have.

Each process writes to a file of its own, ``$LGQ_STACK_DUMP_DIR/<pid>.txt`` (a forked child reopens its own), because
faulthandler writes a traceback in many small writes: two processes dumping into one shared stderr pipe at the same
moment interleave mid-line (seen in CI). Without ``LGQ_STACK_DUMP_DIR`` the stacks go to stderr. On a timeout
tests/ddp.py signals the launcher, the ranks and their workers, collects the files, then kills them, so a hang in CI
says where every process waited."""
import faulthandler
import os
import signal
import sys

_dump_file = None  # faulthandler keeps only the file descriptor: the file object must stay alive


def _register_stack_dump() -> None:
    global _dump_file
    if _dump_file is not None:  # a forked child: the parent's file is not its own
        _dump_file.close()
        _dump_file = None
    directory = os.environ.get("LGQ_STACK_DUMP_DIR")
    if directory:
        try:
            _dump_file = open(os.path.join(directory, f"{os.getpid()}.txt"), "w", buffering=1)
        except OSError:  # the test that made the folder has ended: stderr it is
            pass
    faulthandler.register(signal.SIGUSR2, file=_dump_file or sys.stderr, all_threads=True)


_register_stack_dump()
os.register_at_fork(after_in_child=_register_stack_dump)


def _run_the_sitecustomize_this_one_shadows() -> None:
    """Python imports only the first ``sitecustomize`` on sys.path: run the next one (a distribution's or a
    virtual environment's) too, so the tests' processes start like the user's."""
    import importlib.machinery
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    rest = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


_run_the_sitecustomize_this_one_shadows()
