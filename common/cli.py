"""One command-line style for every command of the project, and its console entry points.

    <command> [--option value | --flag ...] [--config FILE.yaml ...] [key=value | --key value ...]

* a command's own options are ``--option value`` (words joined by dashes) and ``--flag``;
* configuration keys (the fields of the command's typed config: ``train.max_steps``, ``data.root``, ...)
  are given as ``key=value`` or, equivalently, ``--key value`` / ``--key=value`` (a boolean key alone,
  ``--flip``, means true);
* ``--help`` lists the options and every configuration key with its default; ``--config`` files
  (repeatable, merged in order) come before the key overrides.

Config paths that start with ``configs/`` are looked up in the current folder first, then among the
recipes shipped with the package (``common/configs/`` in an installed wheel, ``configs/`` in a checkout),
so ``--config configs/tokenizer/builtin.yaml`` works after ``pip install lgq`` from any folder.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import re
import sys
from pathlib import Path
from typing import Any, Sequence

from common.config import config_to_yaml, load_config

KEY_VALUE = re.compile(r"^[A-Za-z_][\w.\-]*=")  # a config key assignment, e.g. train.max_steps=600
PACKAGE_CONFIGS = Path(__file__).resolve().parent / "configs"  # installed wheel: configs/ shipped as package data
CHECKOUT_CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # a source checkout / editable install


def resolve_config_path(path: str | Path) -> Path:
    """``path`` if it exists; else, for ``configs/<rest>``, the shipped recipe ``<rest>``; else ``path`` unchanged
    (the loader then reports the missing file)."""
    path = Path(path)
    if path.exists() or path.is_absolute():
        return path
    parts = path.parts
    if parts and parts[0] == "configs":
        for root in (PACKAGE_CONFIGS, CHECKOUT_CONFIGS):
            candidate = root.joinpath(*parts[1:])
            if candidate.is_file():
                return candidate
    return path


def config_defaults(schema: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, default) of every leaf field of a dataclass schema, in declaration order."""
    rows: list[tuple[str, Any]] = []
    instance = schema() if isinstance(schema, type) else schema
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            rows.extend(config_defaults(value, key + "."))
        else:
            rows.append((key, value))
    return rows


def config_help(schema: Any, prefix: str = "") -> str:
    """The ``--help`` epilog: every configuration key with its default."""
    rows = config_defaults(schema, prefix)
    width = max(len(key) for key, _ in rows)
    lines = ["configuration keys (key=value or --key value; defaults shown):"]
    lines += [f"  {key:<{width}}  {'(required)' if value == '???' else repr(value)}" for key, value in rows]
    return "\n".join(lines)


def make_parser(prog: str, description: str | None, schema: Any = None, schema_prefix: str = "",
                config_files: bool = True) -> argparse.ArgumentParser:
    """An ArgumentParser in the project's style; with ``schema`` its --help lists the config keys."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     epilog=config_help(schema, schema_prefix) if schema is not None else None,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    if config_files:
        parser.add_argument("--config", action="append", default=[], metavar="FILE.yaml",
                            help="YAML config file; repeat to merge several in order (later files win)")
    return parser


def parse_command_line(parser: argparse.ArgumentParser, argv: Sequence[str] | None, schema: Any = None,
                       schema_prefix: str = "") -> tuple[argparse.Namespace, list[str]]:
    """(the parser's options, ``key=value`` overrides of the config keys).

    Arguments the parser does not declare must be config keys: ``key=value``, ``--key value``,
    ``--key=value`` (dashes in keys become underscores) or a lone ``--key`` for a boolean key.
    Anything else is reported by ``parser.error`` (exit status 2, usage printed). Unknown keys are
    left to ``load_config``, which names them with the closest valid key.
    """
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    # key=value items may stand anywhere, also after an option that takes several values (--seeds 0 1 2 key=value)
    assignments = [a for a in argv if KEY_VALUE.match(a)]
    args, rest = parser.parse_known_args([a for a in argv if not KEY_VALUE.match(a)])
    rest += assignments
    bool_keys = {key for key, value in config_defaults(schema, schema_prefix) if isinstance(value, bool)} \
        if schema is not None else set()
    overrides, i = [], 0
    while i < len(rest):
        item = rest[i]
        if item.startswith("--"):
            key, value = (item[2:].split("=", 1) + [None])[:2]
            key = key.replace("-", "_")
            if value is None:
                if key in bool_keys and (i + 1 == len(rest) or rest[i + 1].startswith("--") or "=" in rest[i + 1]):
                    value = "true"
                elif i + 1 < len(rest) and not rest[i + 1].startswith("--"):
                    value = rest[i + 1]
                    i += 1
                else:
                    parser.error(f"option {item} needs a value")
            overrides.append(f"{key}={value}")
        elif "=" in item and not item.startswith("-"):
            key, value = item.split("=", 1)
            overrides.append(f"{key.replace('-', '_')}={value}")
        else:
            parser.error(f"cannot parse argument {item!r}: use --option value, key=value or --key value")
        i += 1
    if isinstance(getattr(args, "config", None), list):  # make_parser's repeatable --config
        args.config = [str(resolve_config_path(p)) for p in args.config]
    return args, overrides


# ------------------------------------------------------------------------------------ the train scripts
def parse_train_arguments(schema: Any, argv: Sequence[str] | None, description: str | None,
                          prog: str) -> tuple[argparse.Namespace, list[str]]:
    """The train scripts' command line (common.cli style): --config (repeatable), --resume, --print-config and the
    config keys of ``schema`` as key=value / --key value. Shared by the tokenizer and prior scripts."""
    parser = make_parser(prog, description, schema)
    parser.add_argument("--resume", default=None, help="'latest' or a checkpoint directory (= train.resume=...)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (defaults <- files <- overrides) as YAML and exit")
    args, overrides = parse_command_line(parser, argv, schema)
    if args.resume is not None:
        overrides.append(f"train.resume={args.resume}")
    return args, overrides


def load_run_config(schema: Any, argv: Sequence[str] | None, description: str, prog: str):
    """(config, print_only): the config of a train script's command line; with --print-config it is printed."""
    args, overrides = parse_train_arguments(schema, argv, description, prog)
    cfg = load_config(schema, args.config or None, overrides)
    if args.print_config:
        print(config_to_yaml(cfg), end="")
    return cfg, args.print_config


# ------------------------------------------------------------------------------------------- entry points
COMMANDS = {
    "lgq-train-tokenizer": "tokenizer.train",
    "lgq-extract-tokens": "prior.extract",
    "lgq-train-prior": "prior.train",
    "lgq-assemble": "pipelines.assemble",
    "lgq-eval-reconstruction": "eval.reconstruction",
    "lgq-eval-generation": "eval.gen_fid",
    "lgq-demo": "experiments.demo",
    "lgq-study": "experiments.study",
    "lgq-prune-tokenizer": "tokenizer.prune",
    "lgq-codebook-geometry": "eval.codebook_geometry",
    "lgq-app": "pipelines.app",
}


def run(module: str, argv: Sequence[str] | None = None) -> int:
    """Run ``module.main(argv)`` as a console command: exit status 0 unless main returns an int status."""
    status = importlib.import_module(module).main(sys.argv[1:] if argv is None else list(argv))
    return status if isinstance(status, int) else 0


def _entry_point(module: str):
    def main() -> int:
        return run(module)

    main.__doc__ = f"console entry point: python -m {module}"
    return main


train_tokenizer = _entry_point(COMMANDS["lgq-train-tokenizer"])
extract_tokens = _entry_point(COMMANDS["lgq-extract-tokens"])
train_prior = _entry_point(COMMANDS["lgq-train-prior"])
assemble = _entry_point(COMMANDS["lgq-assemble"])
eval_reconstruction = _entry_point(COMMANDS["lgq-eval-reconstruction"])
eval_generation = _entry_point(COMMANDS["lgq-eval-generation"])
demo = _entry_point(COMMANDS["lgq-demo"])
study = _entry_point(COMMANDS["lgq-study"])
prune_tokenizer = _entry_point(COMMANDS["lgq-prune-tokenizer"])
codebook_geometry = _entry_point(COMMANDS["lgq-codebook-geometry"])
app = _entry_point(COMMANDS["lgq-app"])
