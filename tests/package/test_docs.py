"""Issue 20: README.md is one screen with links; every command's --help ends with the page to read, and
every page and link it names exists."""

import re
from pathlib import Path

from click.testing import CliRunner

from soup.cli import cli

ROOT = Path(__file__).resolve().parents[2]


def test_every_command_help_ends_with_an_existing_page():
    for name in cli.commands:
        result = CliRunner().invoke(cli, [name, "--help"])
        assert result.exit_code == 0, result.output
        last = result.output.strip().splitlines()[-1].strip()
        match = re.fullmatch(r"Read more: (\S+) in soup's source tree\.", last)
        assert match, f"soup {name} --help ends with {last!r}"
        assert (ROOT / match.group(1)).is_file(), match.group(1)


def test_readme_is_one_screen_whose_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 60
    targets = re.findall(r"\]\(([^)#\s]+)", readme)
    assert {"docs/recipes.md", "docs/training.md", "docs/cooking.md", "docs/evaluating.md", "docs/shipping.md",
            "docs/scaling.md", "docs/troubleshooting.md", "docs/soups.png"} <= set(targets)
    for page in (ROOT / "docs").glob("*.md"):
        for target in re.findall(r"\]\(([^)#\s]+)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links to a missing {target}"
    assert all((ROOT / target).exists() for target in targets)
