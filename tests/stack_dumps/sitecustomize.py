"""Imported at start-up by every Python process the multi-process tests launch (tests/ddp.py puts this folder on
PYTHONPATH; DataLoader workers inherit it through fork): SIGUSR2 writes the stack of every thread to stderr. On a
timeout tests/ddp.py sends it to the launcher, the ranks and their workers before killing them, so a hang in CI
says where every process waited."""
import faulthandler
import signal

faulthandler.register(signal.SIGUSR2, all_threads=True)
