"""Peer code for the side-by-side benchmarks: imported from a checkout the user names on the command line
(``--llamagen PATH``, ``--authors-lgq PATH``), never vendored into this repository.

    git clone https://github.com/FoundationVision/LlamaGen /tmp/peers/LlamaGen
    git clone https://github.com/KurbanIntelligenceLab/LGQ /tmp/peers/LGQ
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys


def use_peer_checkout(path: str) -> None:
    """Make the checkout at ``path`` importable (its top-level packages: ``autoregressive``, ``quantization``...)."""
    if path not in sys.path:
        sys.path.insert(0, path)


def peer_commit(path: str) -> str:
    """The checkout's commit (12 hex digits), or a note saying it is not a git checkout."""
    try:
        out = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "unknown commit"
    return out.stdout.strip()[:12] if out.returncode == 0 and out.stdout.strip() else "unknown commit (not a git checkout)"


def check_peer_path(parser: argparse.ArgumentParser, option: str, path: str | None, required_file: str,
                    repository: str) -> str | None:
    """``path`` made absolute after checking that it holds ``required_file``; else a parser error naming both."""
    if path is None:
        return None
    path = os.path.abspath(path)
    if not os.path.isfile(os.path.join(path, required_file)):
        parser.error(f"{option} {path}: no {required_file} there (a checkout of {repository})")
    return path
