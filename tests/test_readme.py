"""The README's set-up commands are what CI runs."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    lines = (ROOT / "README.md").read_text().splitlines()
    start = lines.index("```bash")
    end = lines.index("```", start + 1)
    return [line for line in lines[start + 1 : end] if line and not line.startswith("#")]


def test_readme_opens_with_two_setup_commands():
    commands = _readme_commands()
    assert len(commands) == 2, commands
    assert all(cmd.startswith("python3 -m venv .venv && . .venv/bin/activate && ") for cmd in commands)
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command_verbatim():
    test_command = _readme_commands()[1]
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci_lines


def _section(title: str) -> list[str]:
    lines = (ROOT / "README.md").read_text().splitlines()
    start = lines.index(title)
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("## "))
    return lines[start:end]


def test_the_data_section_s_example_rows_have_the_layouts_it_names():
    import json

    from segppo.data import (
        detect_preference_layout,
        detect_prompt_layout,
        to_preference_examples,
        to_prompt_examples,
    )

    rows = [line.split(" | ") for line in _section("## Data") if line.startswith("| `")]
    assert len(rows) == 6
    for layout, kind, example in rows:
        row = json.loads(example.strip(" `|"))
        layout = layout.strip("| `")
        if kind == "pairs":
            assert detect_preference_layout([row]) == layout
            (pair,), report = to_preference_examples([row])
            assert report.skipped == 0 and pair.chosen and pair.rejected
        else:
            assert kind == "prompts" and detect_prompt_layout([row]) == layout
            assert to_prompt_examples([row])[1].skipped == 0


def test_the_data_inspect_output_is_what_the_command_prints(tiny_lm_dir, monkeypatch):
    """The README shows `segppo data inspect` on the tests' data file as measured; it stays true."""
    from segppo.cli.main import app
    from typer.testing import CliRunner

    lines = (ROOT / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("data     tests/data/"))
    shown = lines[start : lines.index("```", start)]
    monkeypatch.chdir(ROOT)  # the path as the README gives it
    args = ["data", "inspect", "tests/data/preferences_with_bad_rows.jsonl", "--model", tiny_lm_dir]
    args += ["--max-len", "64", "--eval-fraction", "0.25"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "80"}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert [line.rstrip() for line in result.output.splitlines()] == shown
