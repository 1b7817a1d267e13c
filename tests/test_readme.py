"""README.md and docs/*.md: the README's Python example runs, code fences pair up, relative links resolve.

Fast (a few seconds): the example builds a small random-weight ViT offline; nothing is exported.
The set-up commands are checked verbatim: CI (.ci/run) and a hook run them as the README states them.
"""

import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
MAX_README_LINES = 220
# CI (.ci/run) and a hook run these two commands as the README states them
SETUP_COMMANDS = [
    'python3 -m venv .venv && .venv/bin/pip install "torch==2.13.0" -e ".[dev]" && .venv/bin/turbo-export vit '
    "--model random:vit-base-patch16-224 --ratio 16",
    ".venv/bin/python -m pytest -q",
]

FENCE = re.compile(r"^ {0,3}```")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
CODE_SPAN = re.compile(r"(`+).*?\1")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def markdown_files() -> list[str]:
    return [README] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def read_lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return f.read().split("\n")


def split_fences(lines: list[str]) -> tuple[list[tuple[int, str]], list[tuple[str, list[str]]]]:
    """(prose lines with their numbers, fenced blocks as (info string, body lines)); an unclosed block is kept."""
    prose, blocks = [], []
    block = None
    for number, line in enumerate(lines, 1):
        if FENCE.match(line):
            if block is None:
                block = (line.strip()[3:].strip(), [])
            else:
                blocks.append(block)
                block = None
            continue
        if block is None:
            prose.append((number, line))
        else:
            block[1].append(line)
    if block is not None:
        blocks.append(block)
    return prose, blocks


def slug(text: str) -> str:
    """GitHub's heading anchor: the rendered text, lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link's text only
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: str) -> set[str]:
    prose, _ = split_fences(read_lines(path))
    seen: dict[str, int] = {}
    result = set()
    for _, line in prose:
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def section(lines: list[str], heading: str) -> list[str]:
    """The lines under `heading` (a level-2 heading) up to the next level-1 or level-2 heading, fences respected."""
    start = next((i for i, line in enumerate(lines) if line.strip() == heading), None)
    assert start is not None, f"README.md has no '{heading}' heading"
    body, in_fence = [], False
    for line in lines[start + 1:]:
        if FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence and re.match(r"^#{1,2}\s", line):
            break
        body.append(line)
    return body


def python_api_examples() -> list[str]:
    _, blocks = split_fences(section(read_lines(README), "## Python API"))
    return ["\n".join(body) for info, body in blocks if info.split()[:1] == ["python"]]


def run_example(code: str, name: str, monkeypatch) -> None:
    """exec the example in a fresh namespace from the repository root, as a reader pastes it into Python there.

    In-process (torch and transformers are imported once for the whole run, which keeps this test fast); the
    global torch RNG state an example seeds is restored afterwards.
    """
    import torch

    monkeypatch.chdir(ROOT)
    state = torch.random.get_rng_state()
    try:
        exec(compile(code, f"README.md ({name})", "exec"), {"__name__": "__readme__"})
    finally:
        torch.random.set_rng_state(state)


def test_readme_python_api_example_runs(monkeypatch, capsys):
    examples = python_api_examples()
    assert examples, "README.md: no ```python block under '## Python API'"
    run_example(examples[0], "Python API example 1", monkeypatch)


def test_readme_python_api_real_weights_examples_run(monkeypatch, capsys):
    """The further Python API examples name files outside the repository (real weights): run where they exist."""
    examples = python_api_examples()[1:]
    if not examples:
        pytest.skip("README.md has one Python API example")
    ran = 0
    for number, code in enumerate(examples, 2):
        paths = re.findall(r"[\"']((?:\.\./)[^\"']+)[\"']", code)
        if any(not os.path.exists(os.path.join(ROOT, p)) for p in paths):
            continue
        run_example(code, f"Python API example {number}", monkeypatch)
        ran += 1
    if not ran:
        pytest.skip("the real-weight examples' files are not beside this checkout")


def test_readme_keeps_the_setup_commands():
    text = "\n".join(read_lines(README))
    for command in SETUP_COMMANDS:
        assert command in text, f"README.md lost the set-up command CI and the hook run: {command}"


def test_readme_is_the_front_door():
    lines = read_lines(README)
    count = len(lines) - (1 if lines and lines[-1] == "" else 0)
    assert count <= MAX_README_LINES, f"README.md has {count} lines (at most {MAX_README_LINES}); move detail to docs/"


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: os.path.relpath(p, ROOT))
def test_code_fences_pair_up(path):
    fences = [number for number, line in enumerate(read_lines(path), 1) if FENCE.match(line)]
    assert len(fences) % 2 == 0, (f"{os.path.relpath(path, ROOT)}: odd number of ``` fences "
                                  f"({len(fences)}, at lines {fences}): one block never closes")


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_resolve(path):
    prose, _ = split_fences(read_lines(path))
    here = os.path.dirname(path)
    broken = []
    for number, line in prose:
        text = CODE_SPAN.sub("", line)
        targets = INLINE_LINK.findall(text)
        reference = REFERENCE_LINK.match(text)
        if reference:
            targets.append(reference.group(1))
        for target in targets:
            if SCHEME.match(target) or target.startswith("//"):
                continue  # http(s), mailto: not checked here
            file_part, _, fragment = target.partition("#")
            linked = os.path.normpath(os.path.join(here, file_part)) if file_part else path
            if not os.path.exists(linked):
                broken.append(f"line {number}: {target} (no such file)")
            elif fragment and linked.endswith(".md") and fragment not in anchors(linked):
                broken.append(f"line {number}: {target} (no heading '#{fragment}' in {os.path.relpath(linked, ROOT)})")
    assert not broken, f"{os.path.relpath(path, ROOT)}: broken links:\n" + "\n".join(broken)


def test_every_doc_is_linked_from_the_readme():
    text = "\n".join(read_lines(README))
    missing = [os.path.relpath(p, ROOT) for p in markdown_files()[1:]
               if f"]({os.path.relpath(p, ROOT)}" not in text]
    assert not missing, f"README.md does not link {missing}"
