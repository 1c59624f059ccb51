"""`--help` of every command: options in panels by purpose, required ones first, names whole at 80 columns."""

from __future__ import annotations

import dataclasses
import re

import pytest
import typer
from segppo.cli.main import app
from typer.testing import CliRunner

from segppo.config_fields import PANELS, option

runner = CliRunner()


def commands(group=None, path=()):
    """(path, click command) of every command of the app, groups included."""
    group = group or typer.main.get_command(app)
    yield path, group
    for name, command in getattr(group, "commands", {}).items():
        yield from commands(command, (*path, name))


ALL = dict(commands())
LEAVES = {path: c for path, c in ALL.items() if not hasattr(c, "commands")}
CONFIG_COMMANDS = {
    path: c.callback.config_class for path, c in LEAVES.items() if hasattr(c.callback, "config_class")
}


def help_at_80(path) -> str:
    result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    return result.output


def panels(output: str) -> dict[str, str]:
    """Option name -> title of the panel it is listed in."""
    where, title = {}, None
    for line in output.splitlines():
        if line.startswith("╭─ "):
            title = line[3:].split(" ─")[0]
        elif line.startswith("│ ") and title is not None:
            for name in re.findall(r"(?<![\w-])--[\w-]+", line[2:].split("  ")[0]):
                where[name] = title
    return where


def test_the_app_has_the_commands_the_tests_walk():
    expected = {("rm", "train"), ("ppo", "train"), ("fit-normalizer",), ("eval",), ("demo",)}
    assert expected <= set(CONFIG_COMMANDS)


@pytest.mark.parametrize("path", list(ALL), ids=lambda p: " ".join(p) or "segppo")
def test_help_at_80_columns_shows_every_option_name_whole(path):
    output = help_at_80(path)
    assert "…" not in output
    assert max(len(line) for line in output.splitlines()) <= 80
    names = set(re.findall(r"(?<![\w-])--?[\w-]+", output))
    for param in ALL[path].params:
        for name in [*param.opts, *param.secondary_opts]:
            if name.startswith("-"):
                assert name in names, f"{' '.join(path)} --help at 80 columns: {name} is not shown whole"
    for name in getattr(ALL[path], "commands", {}):
        assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", output), name


@pytest.mark.parametrize("path", list(CONFIG_COMMANDS), ids=" ".join)
def test_every_config_field_declares_its_help_panel(path):
    config_cls = CONFIG_COMMANDS[path]
    missing = [f.name for f in dataclasses.fields(config_cls) if f.metadata.get("panel") not in PANELS]
    assert not missing, (
        f"{config_cls.__name__}: no --help panel for {missing}. Declare each field as "
        f"`name: type = option(default, panel=..., help=...)` with a panel of segppo.config_fields "
        f"({', '.join(PANELS)})"
    )


@pytest.mark.parametrize("path", list(CONFIG_COMMANDS), ids=" ".join)
def test_options_are_in_their_fields_panels_with_required_ones_first(path):
    output = help_at_80(path)
    where = panels(output)
    for f in dataclasses.fields(CONFIG_COMMANDS[path]):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        name = "--" + f.name.replace("_", "-")
        if f.metadata.get("argument"):
            continue
        assert where[name] == ("Required" if required else f.metadata["panel"]), name
    titles = re.findall(r"^╭─ (.+?) ─", output, flags=re.M)
    order = ["Required", *PANELS]
    assert titles == sorted(titles, key=order.index), titles
    assert len(titles) == len(set(titles))
    assert where["--help"] == "Run and logging"


def test_rm_train_opens_with_model_dataset_and_output():
    where = panels(help_at_80(("rm", "train")))
    required = ["--model", "--dataset", "--output"]
    assert [name for name, title in where.items() if title == "Required"] == required
    assert list(where)[:3] == required
    assert where["--entropy-threshold"] == "Segments and rewards"
    assert where["--lora-rank"] == "Memory and scale"


def test_a_field_without_a_panel_still_gets_an_option_under_other_options():
    from segppo.cli.help import GroupedHelpCommand
    from segppo.cli.options import config_options

    @dataclasses.dataclass
    class Config:
        model: str = option(panel="Model", help="The model.")
        strict: bool = False
        limit: int = option(3, help="A field of another engineer's branch, without a panel yet.")

    @config_options(Config)
    def command(values):
        pass

    small = typer.Typer()
    small.command(cls=GroupedHelpCommand)(command)
    small.command("other")(lambda: None)
    where = panels(runner.invoke(small, ["command", "--help"], env={"COLUMNS": "80"}).output)
    assert where["--model"] == "Required" and where["--strict"] == where["--limit"] == "Other options"


def test_an_unknown_panel_is_an_error_naming_the_panels():
    with pytest.raises(ValueError, match="unknown help panel 'Misc'.*'Data'"):
        option(1, panel="Misc", help="x")
