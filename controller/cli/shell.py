"""`diffops` in the shell: `diffops completion bash|zsh|fish`, and every option from a `DIFFOPS_<OPTION>` variable.

The environment scheme is flat, as helm's and argocd's are: `--state-dir` reads DIFFOPS_STATE_DIR in every
command that has it, `-o/--output` reads DIFFOPS_OUTPUT, `--no-color` DIFFOPS_NO_COLOR. A flag given on the
command line wins over the environment, which wins over the default. `apply_envvars` is run once on the
finished command tree by `controller.cli.main`.
"""

from __future__ import annotations

import click
from click.shell_completion import get_completion_class

__all__ = ["COMPLETE_VAR", "ENV_PREFIX", "NO_ENVVAR", "apply_envvars", "completion", "envvar_for"]

ENV_PREFIX = "DIFFOPS_"
COMPLETE_VAR = "_DIFFOPS_COMPLETE"
# Options that name what one invocation writes or targets: from the environment they would act on every command
# (DIFFOPS_OUTPUT=json would make `generate` write a file named "json"). (command name, parameter name).
# The `--json` aliases stay command-line only: DIFFOPS_OUTPUT is their variable.
NO_ENVVAR = {("generate", "output"), ("schema", "output"), ("generate", "pin"), ("diffops", "version"), ("status", "as_json"),
             ("history", "as_json")}

INSTALL = {
    "bash": 'eval "$(diffops completion bash)"   # in ~/.bashrc (bash 4.4 or newer)',
    "zsh": 'eval "$(diffops completion zsh)"    # in ~/.zshrc',
    "fish": "diffops completion fish > ~/.config/fish/completions/diffops.fish",
}


def envvar_for(option: click.Option) -> str:
    """DIFFOPS_ and the option's long name: `--state-dir` -> DIFFOPS_STATE_DIR."""
    longs = [opt for opt in option.opts if opt.startswith("--")]
    name = max(longs, key=len)[2:] if longs else (option.name or "")
    return ENV_PREFIX + name.upper().replace("-", "_")


def apply_envvars(command: click.Command, name: str = "diffops") -> None:
    """Give every visible option of `command` and its subcommands its DIFFOPS_ variable (shown in --help)."""
    for param in command.params:
        if not isinstance(param, click.Option) or param.hidden or param.envvar is not None:
            continue
        if param.name == "help" or (name, param.name) in NO_ENVVAR:
            continue
        param.envvar = envvar_for(param)
        param.show_envvar = True
    if isinstance(command, click.Group):
        for sub_name, sub in command.commands.items():
            apply_envvars(sub, sub_name)


@click.command(epilog="Install:\n\n\b\n" + "\n".join(f"  {line}" for line in INSTALL.values()))
@click.argument("shell", type=click.Choice(sorted(INSTALL)))
@click.pass_context
def completion(ctx: click.Context, shell: str) -> None:
    """Print the shell completion script for SHELL (commands, options, choices such as -o's formats)."""
    root = ctx.find_root()
    completer = get_completion_class(shell)
    if completer is None:  # unreachable: SHELL is one of click's own
        raise click.UsageError(f"no completion for {shell}")
    click.echo(completer(root.command, {}, "diffops", COMPLETE_VAR).source())  # the installed command's name, however invoked
