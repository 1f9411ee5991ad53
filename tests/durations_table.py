#!/usr/bin/env python
"""tests/README.md's table: every test, its time and the claim it proves (its docstring's first
sentence), from a pytest log of ``--durations=0``.

    .venv/bin/python -m pytest -q --durations=0 -p no:cacheprovider > /tmp/durations.log
    python tests/durations_table.py /tmp/durations.log > /tmp/table.md
"""
import ast
import re
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
LINE = re.compile(r"^\s*([0-9.]+)s\s+(setup|call|teardown)\s+(tests/\S+?\.py)::(\S+)")


def claims(path: Path):
    """{test function name: first sentence of its docstring (or its name)}."""
    out = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
            doc = " ".join((ast.get_docstring(node) or node.name.replace("_", " ")).split())
            out[node.name] = re.split(r"(?<=\.)\s", doc, maxsplit=1)[0][:160]
    return out


def main(log: str) -> None:
    seconds = defaultdict(float)
    for line in Path(log).read_text().splitlines():
        m = LINE.match(line)
        if m:
            seconds[(m.group(3), m.group(4))] += float(m.group(1))
    cache = {}
    rows = sorted(seconds.items(), key=lambda kv: -kv[1])
    print("| test | s | claim |\n|---|---:|---|")
    for (file, test), s in rows:
        if file not in cache:
            cache[file] = claims(HERE.parent / file)
        name = test.split("[")[0]
        print(f"| `{file.split('/')[-1]}::{test}` | {s:.1f} | {cache[file].get(name, '').replace('|', '/')} |")
    print(f"\n{len(rows)} tests, {sum(seconds.values()) / 60:.1f} min of setup + call + teardown in all.")


if __name__ == "__main__":
    main(sys.argv[1])
