"""Launch a real 2-process CPU DDP run (gloo) with accelerate, for tests; and signal a running process.

`accelerate launch --cpu --num_processes 2` silently runs ONE process; the working recipe
is --multi_gpu with ACCELERATE_USE_CPU=true (docs/environment.md §1). Scripts launched this
way should assert the world size they expect.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STACK_DUMPS = ROOT / "tests" / "stack_dumps"  # its sitecustomize.py: SIGUSR2 -> every thread's stack, one file per process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_command(script: str | os.PathLike, *args: str, nproc: int = 2, env: dict | None = None) -> tuple[list, dict]:
    """(command, environment) that runs `script args` under `accelerate launch` with `nproc` CPU processes."""
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", str(nproc), "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()),
        str(script), *map(str, args),
    ]
    full_env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1",
                "PYTHONPATH": os.pathsep.join([str(ROOT), str(STACK_DUMPS), os.environ.get("PYTHONPATH", "")])}
    return cmd, {**full_env, **(env or {})}


def run_until_signal(cmd: list[str], signum: int, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    """Start ``cmd`` (e.g. tests/scripts/train_wait_for_signal.py, alone or under ``ddp_command``), send ``signum``
    to the process that prints "WAITING <pid> <parent pid>" (it waits in the middle of a step) and return the finished
    run (``.launched_pid``: the pid of ``cmd``'s own process)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("WAITING "):
                os.kill(int(line.split()[1]), signum)
                break
        else:
            raise AssertionError(f"run ended before the step: {''.join(lines)[-2000:]}{proc.stderr.read()[-4000:]}")
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    result = subprocess.CompletedProcess(cmd, proc.returncode, "".join(lines) + out, err)
    result.launched_pid = proc.pid
    return result


def _stacks_of_every_process(launcher_pid: int, dump_dir: Path, wait: float = 10.0) -> str:
    """Signal the launcher and every process under it (SIGUSR2: each writes its threads' stacks to
    ``dump_dir/<pid>.txt``, tests/stack_dumps), wait until every file has been written, kill them all (they run in
    sessions of their own and would keep the pipes open) and return the stacks, one section per process."""
    import psutil  # an accelerate dependency

    launcher = psutil.Process(launcher_pid)
    processes = [*launcher.children(recursive=True), launcher]
    described = {}
    for process in processes:
        with contextlib.suppress(psutil.Error):
            rank = process.environ().get("RANK", "-")
            described[process.pid] = f"pid {process.pid} (RANK={rank}): {' '.join(process.cmdline())}"
            process.send_signal(signal.SIGUSR2)
    def dump_sizes() -> dict[int, int]:
        return {pid: path.stat().st_size if (path := dump_dir / f"{pid}.txt").exists() else 0 for pid in described}

    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        sizes = dump_sizes()
        if all(sizes.values()):
            time.sleep(0.5)  # a dump in progress keeps growing
            if sizes == dump_sizes():
                break
        time.sleep(0.2)
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.kill()
    sections = []
    for pid, description in described.items():
        path = dump_dir / f"{pid}.txt"
        stacks = path.read_text() if path.exists() else ""
        sections.append(f"--- threads of {description}\n{stacks or '(no stack written)'}")
    return "\n".join(sections)


def run_ddp(script: str | os.PathLike, *args: str, nproc: int = 2, timeout: float = 600, env: dict | None = None):
    """Run `script args` under `accelerate launch` with `nproc` CPU processes; raise with output on failure, and on a
    hang (e.g. a collective not reached by every rank) with the stack of every thread of every process."""
    with tempfile.TemporaryDirectory(prefix="stack-dumps-") as dump_dir:
        cmd, full_env = ddp_command(script, *args, nproc=nproc, env={"LGQ_STACK_DUMP_DIR": dump_dir, **(env or {})})
        with subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) as popen:
            try:
                stdout, stderr = popen.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                stacks = _stacks_of_every_process(popen.pid, Path(dump_dir))
                stdout, stderr = popen.communicate()
                raise AssertionError(f"DDP run did not finish within {timeout} s (hang?): {' '.join(cmd)}\n"
                                     f"--- stdout\n{stdout[-4000:]}\n--- stderr\n{stderr[-6000:]}\n{stacks}") from None
    proc = subprocess.CompletedProcess(cmd, popen.returncode, stdout, stderr)
    if proc.returncode != 0:
        raise AssertionError(
            f"DDP run failed ({proc.returncode}): {' '.join(cmd)}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc
