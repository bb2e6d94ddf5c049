"""``edgepart agent``: the device agent's own options, shown and parsed like every command.

The agent's options are defined once, as an argparse parser in ``edgepart.device_agent.__main__``
(``python -m edgepart.device_agent`` uses it as is). ``agent_command`` turns that parser into a
typer command, so ``edgepart agent --help`` and its usage errors look like every other
command's (choices listed, exit 2); its values are turned back into the argument list
the agent's own ``main`` parses and checks. Importing ``device_agent`` loads torch, so
``edgepart.controller.cli`` imports this module only when ``edgepart agent`` runs.
"""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Callable
from typing import Annotated, Any, Literal

import typer

HELP = "One device agent: joins a testbed's broker and hosts the blocks it is given."


def run_agent_command(args: list[str]) -> int:
    """Parse args as ``edgepart agent`` and run the agent; the exit code."""
    from edgepart.device_agent.__main__ import main, parser

    app = typer.Typer(add_completion=False)
    app.command(help=HELP)(agent_command(parser(), main))
    try:
        app(args, prog_name="edgepart agent")
    except SystemExit as done:  # typer exits with the code: the agent's, or 2 for bad input
        return done.code if isinstance(done.code, int) else 1
    return 0


def agent_command(parser: argparse.ArgumentParser, main: Callable[[list[str]], int]):
    """A function typer reads as a command with the parser's options; it runs main."""
    actions = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    parameters = [_parameter(action) for action in actions]

    def command(**values: Any) -> None:
        raise typer.Exit(main(_argv(actions, values)))

    command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in parameters}
    return command


def _parameter(action: argparse.Action) -> inspect.Parameter:
    """The typer parameter of one argparse option: same names, type, default, choices."""
    flag = isinstance(action, argparse._StoreTrueAction)
    if flag:
        kind: Any = bool
    elif action.choices is not None:
        kind = Literal[tuple(action.choices)]  # typer lists the choices in --help
    else:
        kind = action.type or str
    if not (flag or action.required or action.default is not None):
        kind = kind | None
    # with its names given, a bool option is a plain flag (no --no-... twin)
    option = typer.Option(*action.option_strings, help=_sentence(action.help or ""))
    default = inspect.Parameter.empty if action.required else action.default
    return inspect.Parameter(
        action.dest, inspect.Parameter.KEYWORD_ONLY, default=default,
        annotation=Annotated[kind, option],
    )  # fmt: skip


def _sentence(text: str) -> str:
    """argparse's lower-case help as the other commands write theirs."""
    text = text.strip()
    if not text:
        return text
    return text[0].upper() + text[1:] + ("" if text.endswith(".") else ".")


def _argv(actions: list[argparse.Action], values: dict[str, Any]) -> list[str]:
    """The argument list that gives the agent's parser these values."""
    argv: list[str] = []
    for action in actions:
        value = values[action.dest]
        if isinstance(action, argparse._StoreTrueAction):
            argv += [action.option_strings[-1]] if value else []
        elif value is not None and value != action.default:
            argv += [action.option_strings[-1], str(value)]
    return argv
