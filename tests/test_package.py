import subprocess
import sys


def test_import_has_no_side_effects_on_other_libraries():
    # Importing tunesmith must not import (let alone patch) transformers, peft or torch:
    # the public names load lazily, on first use.
    code = "import sys, tunesmith; print(sorted(m for m in ('torch', 'transformers', 'peft', 'trl') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
