"""What a stage hands the `observe-r1` command for each subcommand it adds.

A stage declares its subcommands in pyproject.toml, in the `observe_r1.commands` entry-point group
(`name = "package.module:OBJECT"`, OBJECT a `Command`); `observe_r1.cli` finds them there, so the core
never imports a stage.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

ENTRY_POINT_GROUP = "observe_r1.commands"


@dataclass(frozen=True)
class Command:
    """One subcommand: `add_arguments` fills its parser, `run` does the work and returns the exit status
    (None: 0). With `passthrough`, the command parses its own arguments: `run` gets the raw list."""

    help: str
    run: Callable[[Any], int | None]
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    passthrough: bool = False
