"""Data that needs no download, for the demo and tests: three clearly different domains.

* ``python-stdlib``: source files of the Python standard library (code);
* ``pydoc-topics``: the English reference text of ``pydoc_data/topics.py`` (prose);
* ``arithmetic``: generated arithmetic, algebra and word problems, each line with its answer (math);
* ``code-lines``, ``math-lines``, ``prose-lines``: small synthetic corpora (``moekit.tiny``) for tests.

Recipes name them ``builtin:NAME``; :func:`materialize` writes them once as JSONL files.
"""

from __future__ import annotations

import json
import random
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from moekit.errors import DataError

BUILTIN_PREFIX = "builtin:"
_CODE_BUDGET_BYTES = 3_000_000  # enough stdlib code to match the other domains' scale


def _stdlib_files() -> Iterator[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    budget = _CODE_BUDGET_BYTES
    for path in sorted(root.rglob("*.py")):
        skip = {"test", "tests", "pydoc_data", "site-packages", "idlelib", "lib2to3"}
        if skip & set(path.relative_to(root).parts):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        yield text
        budget -= len(text)
        if budget <= 0:
            return


def _pydoc_topics() -> Iterator[str]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield topics[name]


def arithmetic_lines(count: int = 60_000, seed: int = 0) -> Iterator[str]:
    """The ``arithmetic`` domain's lines (the demo trains on the default stream; ``moekit.tasks`` draws held-out
    problems from another)."""
    rng = random.Random(seed)
    names = ("Ann", "Bob", "Chen", "Dana", "Eli", "Fay", "Gus", "Hana")
    items = ("apples", "books", "coins", "pens", "stamps", "marbles")
    for _ in range(count):
        kind = rng.randrange(6)
        a, b = rng.randint(2, 999), rng.randint(2, 99)
        if kind == 0:
            yield f"{a} + {b} = {a + b}"
        elif kind == 1:
            yield f"{a} - {b} = {a - b}"
        elif kind == 2:
            yield f"{b} * {a % 50} = {b * (a % 50)}"
        elif kind == 3:
            x, c = rng.randint(1, 30), rng.randint(1, 50)
            yield f"Solve {b % 12 + 2}x + {c} = {(b % 12 + 2) * x + c}. x = {x}"
        elif kind == 4:
            who, what = rng.choice(names), rng.choice(items)
            yield f"{who} has {a} {what} and gets {b} more. How many {what} does {who} have? {a + b}"
        else:
            yield f"What is {a} divided by {b % 9 + 1}, rounded down? {a // (b % 9 + 1)}"


def _synthetic(domain: str) -> Iterator[str]:
    from moekit.tiny import domain_corpus  # moekit.tiny imports torch: only when this data is written

    yield from domain_corpus(domain, 600).splitlines()


_SOURCES = {
    "python-stdlib": _stdlib_files,
    "pydoc-topics": _pydoc_topics,
    "arithmetic": lambda: arithmetic_lines(),
    "code-lines": lambda: _synthetic("code"),
    "math-lines": lambda: _synthetic("math"),
    "prose-lines": lambda: _synthetic("prose"),
}


def builtin_names() -> list[str]:
    """The names usable as ``builtin:NAME``."""
    return sorted(_SOURCES)


def materialize(spec: str, out_dir: Path) -> Path:
    """Write ``builtin:NAME`` as ``out_dir/NAME.jsonl`` (once) and return the file."""
    name = spec.removeprefix(BUILTIN_PREFIX)
    if name not in _SOURCES:
        raise DataError(
            f"Unknown built-in data '{spec}'.", f"Built-in data: {', '.join('builtin:' + n for n in builtin_names())}."
        )
    path = Path(out_dir) / f"{name}.jsonl"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as handle:
            for text in _SOURCES[name]():
                handle.write(json.dumps({"text": text}) + "\n")
        tmp.replace(path)
    return path
