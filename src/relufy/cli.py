"""The `relufy` command: parsing and error reporting only; `relufy.commands` holds each command's run.

Each subcommand's flags are built from its options dataclass (`relufy.options`) the way TRL's
`TrlParser` builds its subcommands: the subparsers' `parser_class` is a `transformers.HfArgumentParser`,
and `add_parser(..., dataclass_types=Config)` hands it the dataclass, whose fields it turns into flags
(with their `help` metadata and defaults) through `HfArgumentParser`'s public constructor. The parsed
values then make the dataclass, whose `__post_init__` checks them. `--config FILE.yaml` gives any of
those fields from a YAML file; flags on the command line override it.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import logging
import signal
import sys
import threading
from dataclasses import fields
from pathlib import Path

from transformers import HfArgumentParser

from . import __version__
from .commands import COMMANDS, Command, toy_run_note  # noqa: F401 - toy_run_note: part of the CLI's API
from .errors import DataError, RelufyError, is_disk_full

logger = logging.getLogger("relufy")


class _OneLineParser(argparse.ArgumentParser):
    """argparse's usage errors as relufy's other errors: one line naming the problem, and where help is."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _CommandParser(HfArgumentParser, _OneLineParser):
    """A subcommand's parser: flags from its options dataclass (HfArgumentParser), errors in one line."""


def _add_command(sub, command: Command) -> None:
    p = sub.add_parser(command.name, help=command.help, description=command.description,
                       dataclass_types=[command.config])
    for flags, kwargs in command.arguments:
        p.add_argument(*flags, **kwargs)
    # an option the dataclass requires may come from --config: make_config asks for it once that is read
    required = [action for action in p._actions if action.required and action.option_strings]
    for action in required:
        action.required = False
    p.set_defaults(required_options=required, command_spec=command, command_parser=p)
    p.add_argument("--config", metavar="FILE.yaml", help="read any of the options above from this YAML "
                   "file (its keys are the option names, e.g. block_size: 512); flags given here override it")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="relufy")
    parser.description = "Turn Swish/GELU LLMs into sparse ReLU LLMs: convert, train (ProSparse), evaluate, publish."
    parser.add_argument("--version", action="version", version=f"relufy {__version__}")
    parser.add_argument("--verbose", "-v", action="store_true", help="log details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_CommandParser)
    for command in COMMANDS:
        _add_command(sub, command)
    return parser


def make_config(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]):
    """The command's checked options dataclass. A `--config` file's values become the subparser's defaults and
    the arguments are parsed again, so flags override it."""
    spec = args.command_spec
    if args.config:
        subparser = args.command_parser
        values = _config_file(Path(args.config), spec.config)
        for action in subparser._actions:
            if action.dest in values:
                action.required = False
        subparser.set_defaults(**values)
        args = parser.parse_args(argv)
    missing = ["/".join(action.option_strings) for action in args.required_options
               if getattr(args, action.dest) is None]
    if missing:
        args.command_parser.error(f"the following arguments are required: {', '.join(missing)}")
    return spec.config(**{f.name: getattr(args, f.name) for f in fields(spec.config) if f.init})


def _config_file(path: Path, config: type) -> dict:
    """The options a `--config` YAML gives: a mapping of the dataclass's field names, each at most once."""
    from .recipe import DuplicateKeyError, load_yaml

    import yaml

    if not path.is_file():
        raise DataError(f"--config {path} does not exist; pass a YAML file of the command's options")
    try:
        values = load_yaml(path.read_text())
    except DuplicateKeyError as exc:
        raise DataError(f"--config {path}: key '{exc.key}' appears twice (lines {exc.lines[0]} and "
                        f"{exc.lines[1]}); keep one") from None
    except yaml.YAMLError as exc:
        raise DataError(f"--config {path} is not valid YAML ({str(exc).splitlines()[0]}); fix it") from None
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise DataError(f"--config {path} must be a mapping of option names to values, e.g. block_size: 512")
    known = [f.name for f in fields(config) if f.init]
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"the options are: {', '.join(known)}"
            raise DataError(f"--config {path}: unknown option '{key}'; {hint}")
    return values


def _interrupt(signum, frame):
    """SIGTERM (a job scheduler, `kill`, `timeout`) stops relufy like Ctrl-C: temp folders are removed."""
    raise KeyboardInterrupt


class _QuietHarmless(logging.Filter):
    """DeepSpeed warns "Setting accelerator to CPU" whenever torch sees no GPU, even on a plain convert that
    only imported it through transformers: on such a machine it says nothing new."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Setting accelerator to CPU")


_QUIET_HARMLESS = _QuietHarmless()


def main(argv: list[str] | None = None) -> int:
    command = "relufy"
    logging.getLogger("DeepSpeed").addFilter(_QUIET_HARMLESS)
    in_main_thread = threading.current_thread() is threading.main_thread()  # where signal handlers may be set
    previous = signal.signal(signal.SIGTERM, _interrupt) if in_main_thread else None
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        command = f"relufy {args.command}"
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")
        config = make_config(parser, args, sys.argv[1:] if argv is None else argv)
        return args.command_spec.run(args, config)
    except RelufyError as exc:
        print(f"{command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # a file the user named cannot be read or written: no traceback
        if exc.errno not in _USER_FIXABLE:
            if is_disk_full(exc):
                return _disk_full(command, exc)
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"{command}: error: {exc.strerror}{where}; check the path, its permissions and free space",
              file=sys.stderr)
        return 1
    except Exception as exc:  # safetensors' SafetensorError and torch's errors are no OSError, even on a full disk
        if not is_disk_full(exc):
            raise
        return _disk_full(command, exc)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _disk_full(command: str, exc: BaseException) -> int:
    """One line for a full disk or quota, whichever library noticed it (outputs are written atomically, so
    nothing half-written is left)."""
    print(f"{command}: error: no space left on the device (or the quota is used up) while writing "
          f"({type(exc).__name__}); free space or choose an output on another disk, then run it again",
          file=sys.stderr)
    return 1


_USER_FIXABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOENT, errno.EISDIR,
                 errno.ENOTDIR}
