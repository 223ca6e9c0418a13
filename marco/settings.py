"""Layered settings: built-in defaults < TOML config file < MARCO_* environment < command line.

One `Option` list describes a program's settings once: `add_options` builds the argparse
parser from it and `load_settings` merges the layers. The controller reuses this for its own
options.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError


@dataclass(frozen=True)
class Option:
    """One setting: its key (config file key, `--key-with-dashes` flag, `MARCO_KEY` variable)."""

    key: str
    default: Any
    help: str
    kind: Callable[[str], Any] = str
    repeatable: bool = False      # a list: flag repeatable, env/config comma separated
    metavar: str | None = None
    flag: bool = False            # a boolean switch (--key / --no-key)

    @property
    def env_name(self) -> str:
        return "MARCO_" + self.key.upper()

    @property
    def flag_name(self) -> str:
        return "--" + self.key.replace("_", "-")


def _split_list(value: Any) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [str(item).strip() for item in value if str(item).strip()]
    return [item.strip() for item in str(value).split(",") if item.strip()]


def _parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"not a boolean: {value!r}")


def _convert(option: Option, value: Any, source: str) -> Any:
    try:
        if option.flag:
            return _parse_bool(value)
        if option.repeatable:
            return [option.kind(item) for item in _split_list(value)]
        return option.kind(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: bad value for {option.key}: {exc}") from None


def add_options(parser: argparse.ArgumentParser, options: Sequence[Option]) -> None:
    """Add one flag per option; defaults stay None so we can tell what was given."""
    for option in options:
        env_hint = f" [env {option.env_name}]"
        if option.flag:
            parser.add_argument(option.flag_name, dest=option.key, default=None,
                                action=argparse.BooleanOptionalAction,
                                help=f"{option.help} (default: {option.default}){env_hint}")
        elif option.repeatable:
            parser.add_argument(option.flag_name, dest=option.key, default=None, action="append",
                                metavar=option.metavar, help=f"{option.help}{env_hint}")
        else:
            parser.add_argument(option.flag_name, dest=option.key, default=None,
                                metavar=option.metavar,
                                help=f"{option.help} (default: {option.default}){env_hint}")


def read_config_file(path: str | None, required: bool) -> dict[str, Any]:
    """Load a TOML config file; a missing default file is fine, a missing named one is not."""
    if not path:
        return {}
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        if required:
            raise ConfigError(f"config file {path} does not exist") from None
        return {}
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    return {key.replace("-", "_"): value for key, value in data.items()}


def merge_settings(options: Sequence[Option], args: argparse.Namespace,
                   environ: Mapping[str, str], file_values: Mapping[str, Any],
                   file_name: str = "config file") -> dict[str, Any]:
    """Merge defaults < config file < environment < command line into one dict."""
    known = {option.key for option in options}
    unknown = sorted(set(file_values) - known)
    if unknown:
        raise ConfigError(f"{file_name}: unknown setting(s): {', '.join(unknown)}")
    values: dict[str, Any] = {}
    for option in options:
        value = option.default
        if option.key in file_values:
            value = _convert(option, file_values[option.key], file_name)
        if option.env_name in environ:
            value = _convert(option, environ[option.env_name], option.env_name)
        given = getattr(args, option.key, None)
        if given is not None:
            if option.repeatable:
                given = [item for raw in given for item in _split_list(raw)]
            value = _convert(option, given, option.flag_name)
        values[option.key] = value
    return values


def add_config_argument(parser: argparse.ArgumentParser, default_path: str) -> None:
    """The --config flag every Marco daemon has."""
    parser.add_argument("--config", metavar="PATH",
                        help=f"TOML config file (default {default_path} if present) "
                             "[env MARCO_CONFIG]")


def load_settings(options: Sequence[Option], args: argparse.Namespace,
                  environ: Mapping[str, str], default_path: str) -> dict[str, Any]:
    """Read the config file (--config, else $MARCO_CONFIG, else `default_path` if it exists:
    a file named explicitly must exist) and merge every layer."""
    path = args.config or environ.get("MARCO_CONFIG") or None
    required = path is not None
    path = path or default_path
    return merge_settings(options, args, environ, read_config_file(path, required),
                          file_name=path)


def default_state_dir(name: str) -> str:
    """/var/lib/NAME for root, the XDG state dir otherwise."""
    if os.geteuid() == 0:
        return f"/var/lib/{name}"
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(base, name)
