"""The version floors: what pyproject.toml declares is what `import tunesmith` checks and what
`make test-compat` installs."""

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from tunesmith import _versions

ROOT = Path(__file__).resolve().parent.parent


def declared_floors() -> dict[str, str]:
    block = re.search(
        r"^dependencies = \[(.*?)^\]", (ROOT / "pyproject.toml").read_text(), re.S | re.M
    ).group(1)
    deps = re.findall(r'^\s*"([^"]+)"', block, re.M)
    assert len(deps) >= 9, deps  # torch ... matplotlib
    return {m.group(1): m.group(2) for d in deps if (m := re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", d))}


def test_pyproject_floors_are_the_ones_checked_at_import():
    floors = declared_floors()
    assert {k: floors[k] for k in _versions.MINIMUM_VERSIONS} == _versions.MINIMUM_VERSIONS


def test_an_old_version_stops_the_import_with_one_message_naming_package_and_version(monkeypatch):
    real = metadata.version
    monkeypatch.setattr(
        _versions.metadata, "version", lambda name: "0.15.2" if name == "peft" else real(name)
    )
    with pytest.raises(ImportError) as caught:
        _versions.check_versions()
    message = str(caught.value)
    assert "peft 0.15.2 is installed; tunesmith needs peft>=0.19.0" in message
    assert 'pip install -U "peft>=0.19.0"' in message
    assert "transformers" not in message  # only the package that is too old


@pytest.mark.parametrize(
    "version, floor, ok",
    [("2.13.0+cpu", "2.6", True), ("2.5.1", "2.6", False), ("5.18.0", "5.18.0", True), ("5.4.0", "5.18.0", False),
     ("5.18.0rc1", "5.18.0", True), ("1.10.1", "1.3.0", True)],
)  # fmt: skip
def test_versions_compare_by_release_numbers(version, floor, ok):
    assert (_versions._release(version) >= _versions._release(floor)) is ok


def test_floor_constraints_pin_every_declared_floor():
    out = subprocess.run(
        [sys.executable, str(ROOT / ".ci" / "floor_constraints.py")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert "transformers==5.18.0" in out and "peft==0.19.0" in out and "accelerate==1.3.0" in out
    assert "datasets==3.6.0" in out and "torch==2.6.*" in out
    without_torch = subprocess.run(
        [sys.executable, str(ROOT / ".ci" / "floor_constraints.py"), "--without", "torch"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert not any(line.startswith("torch") for line in without_torch)
