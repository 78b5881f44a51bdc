"""Print pip constraints that pin the checked dependencies of pyproject.toml to their declared floors.

    python .ci/floor_constraints.py > floor.txt                 # transformers==5.18.0, torch==2.6.*, ...
    python .ci/floor_constraints.py --without torch > floor.txt  # torch comes from a local wheel

`make test-compat` installs tunesmith with these constraints and runs the suite, so the floors in
pyproject.toml stay true. A floor with two parts ("2.6") pins the series ("2.6.*"). Pinned: the
libraries whose floors `import tunesmith` checks (src/tunesmith/_versions.py); the small ones
(safetensors, gguf, pyyaml, matplotlib) resolve as usual, within their declared ranges.
"""

import argparse
import re
from pathlib import Path


def dependencies(pyproject: str) -> list[str]:
    """The strings of `[project] dependencies = [...]` (read with a pattern: tomllib is Python 3.11+)."""
    block = re.search(r"^dependencies = \[(.*?)^\]", pyproject, re.S | re.M).group(1)
    return re.findall(r'^\s*"([^"]+)"', block, re.M)


CHECKED = ("torch", "transformers", "peft", "accelerate", "datasets")

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--without", action="append", default=[], help="a package to leave unpinned")
args = parser.parse_args()
pyproject = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
for dependency in dependencies(pyproject):
    match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", dependency)
    if match is None or match.group(1) not in CHECKED or match.group(1) in args.without:
        continue
    name, floor = match.groups()
    print(f"{name}=={floor}.*" if floor.count(".") == 1 else f"{name}=={floor}")
