"""What every `mer` subcommand shares: one-line flag errors, defaults in --help, flag types
that name what they want, and the exceptions the entry point turns into exit codes."""

from __future__ import annotations

import argparse
import math

from mer.errors import MerError
from mer.kernels import ACTIVATIONS

EXIT_FLAG = 2


class FlagError(MerError):
    """A flag's value or combination is wrong (exit 2, like argparse's own errors)."""


class Interrupted(BaseException):
    """A signal asked mer to stop (raised from the handler, so `finally` blocks run)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors and defaults in --help."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_FLAG, f"mer: error: {message} (see `{self.prog} --help`)\n")


class HelpFormatter(argparse.HelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "%(default)" in text or default in (None, False, argparse.SUPPRESS):
            return text
        if action.option_strings or action.nargs in ("?", "*"):
            text += " (default: %(default)s)"
        return text


def text(value: str) -> str:
    """A text argument: it must be valid UTF-8 (argv bytes that are not arrive as surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError("not valid UTF-8 text") from None
    return value


def whole(minimum: int):
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
        if number < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {number}")
        return number

    parse.__name__ = "whole number"
    return parse


def finite(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {value!r}")
    return number


def parse_size(given: str) -> int:
    """Bytes from "123", "64K", "512M", "2G", "1.5G" (powers of 1024)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    value = given.strip().upper().removesuffix("B").removesuffix("I")
    unit = value[-1:] if value[-1:] in units else ""
    try:
        number = float(value[: len(value) - len(unit)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {given!r} (try 2G or 512M)") from None
    if not math.isfinite(number) or number * units[unit] >= 1 << 62:
        raise argparse.ArgumentTypeError(f"not a size this machine can have: {given!r}")
    if number <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {given!r}")
    return int(number * units[unit])


ACTIVATIONS_HELP = (
    "q8: quantized weights (every GGUF block type) against activations quantized to 8 "
    "bits, integer dot products as llama.cpp computes them (several times faster); f32: "
    "float activations (within float rounding of the dequantized weights, as transformers "
    "computes them). Default: a store's own, else q8"
)


def add_activations(p) -> None:
    """The --activations flag of the commands that load a model."""
    p.add_argument("--activations", choices=ACTIVATIONS, help=ACTIVATIONS_HELP)
