"""The documentation: relative links resolve, and the recipe commands it shows parse.

Commands are checked in this process, without running them: the flag names against the
`flags.DEFINE_*` calls of the recipe's `__main__.py` and `recipes/common/cli.py` (read
from their source: importing the three recipes' `__main__` modules would define
`--workdir` three times in absl's global flags), the subcommand against its `COMMANDS`,
and `--config=...:VARIANT` / `--config.FIELD=` by parsing the config as the recipe would.
"""

import ast
import functools
import pathlib
import re
import shlex

import pytest
from recipe_testing import ROOT, parse_config

README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
_FENCE = re.compile(r"^```[^\n]*\n.*?^```", re.S | re.M)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _links(page: pathlib.Path) -> list[str]:
    """The targets of the page's Markdown links and images, outside code blocks."""
    return re.findall(r"\]\(([^)\s]+)\)", _FENCE.sub("", page.read_text()))


def _anchors(page: pathlib.Path) -> set[str]:
    text = _FENCE.sub("", page.read_text())
    return {_slug(h) for h in re.findall(r"^#+ (.*)$", text, re.M)}


def broken_links(page: pathlib.Path) -> list[str]:
    """The page's relative links whose file (or heading) does not exist."""
    broken = []
    for target in _links(page):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not ours to check
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path) if path else page
        if not file.exists() or (anchor and file.suffix == ".md"
                                 and anchor not in _anchors(file)):
            broken.append(target)
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    assert not broken_links(page)


def commands(text: str) -> list[list[str]]:
    """Every `python -m recipes.NAME ...` in the text's bash blocks and inline code, as argv."""
    lines = [line for block in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M)
             for line in block.replace("\\\n", " ").splitlines()]
    lines += re.findall(r"`(python -m recipes\.[^`]+)`", _FENCE.sub("", text))
    found = []
    for line in lines:
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        tokens = list(lexer)
        for i in range(len(tokens) - 2):
            if (tokens[i:i + 2] == ["python", "-m"] and tokens[i + 2].startswith("recipes.")
                    and tokens[i + 2] != "recipes.NAME"):  # the placeholder in prose
                end = next((j for j in range(i, len(tokens)) if set(tokens[j]) <= set(";&|")),
                           len(tokens))
                found.append(tokens[i + 2:end])
    return found


@functools.cache
def _defined(path: pathlib.Path) -> tuple[set[str], tuple[str, ...]]:
    """The flag names a module defines, and its `COMMANDS`."""
    names, known = set(), ()
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and (node.func.attr.startswith("DEFINE_") or node.func.attr == "define_config")
                and node.args and isinstance(node.args[0], ast.Constant)):
            names.add(node.args[0].value)
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and getattr(node.targets[0], "id", None) == "COMMANDS"):
            known = ast.literal_eval(node.value)
    return names, known


def check_command(argv: list[str]) -> None:
    """Raises if `python -m ARGV` has an unknown recipe, subcommand, flag or config."""
    recipe = argv[0].removeprefix("recipes.")
    main = ROOT / "recipes" / recipe / "__main__.py"
    assert main.is_file(), f"no recipe {argv[0]}"
    names, known = _defined(main)
    names |= _defined(ROOT / "recipes" / "common" / "cli.py")[0]
    config_args, positional = [], []
    for arg in argv[1:]:
        if not arg.startswith("--"):
            positional.append(arg)
            continue
        name, _, value = arg[2:].partition("=")
        if name == "config":
            config_args.append(f"--config={ROOT / value}")
        elif name.startswith("config."):
            config_args.append(arg)
        else:
            assert name in names, f"{argv[0]}: unknown flag --{name}"
    if positional:
        assert positional[0] in known, f"{argv[0]}: unknown command {positional[0]!r}"
    parse_config(recipe, *config_args)


def test_readme_shows_every_recipe():
    assert {argv[0] for argv in commands(README.read_text())} == {
        "recipes.sentiment", "recipes.language_model", "recipes.copy_task"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_commands_parse(page):
    for argv in commands(page.read_text()):
        check_command(argv)


@pytest.mark.parametrize("command", [
    "python -m recipes.sentiment --workdri=runs/x",
    "python -m recipes.sentiment evaluat --model=runs/x/export",
    "python -m recipes.copy_task --config=configs/copy_task.py:chrono5000",
    "python -m recipes.language_model --config.unitz=3",
    "python -m recipes.nonesuch --workdir=x",
])
def test_a_bad_command_fails(command):
    with pytest.raises(Exception):  # noqa: B017 (AssertionError, RecipeError, ValueError)
        for argv in commands(f"`{command}`"):
            check_command(argv)


def test_a_broken_link_fails(tmp_path):
    (tmp_path / "there.md").write_text("# Here\n")
    page = tmp_path / "page.md"
    page.write_text("[a](there.md) [b](there.md#here) [c](gone.md) [d](there.md#gone) "
                    "[e](https://example.com/x) ![f](gone.png)\n```\n[g](gone.md)\n```\n")
    assert broken_links(page) == ["gone.md", "there.md#gone", "gone.png"]
