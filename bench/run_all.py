"""Run every benchmark with the settings quoted in bench/RESULTS.md (`make bench`).

Takes about 40 minutes on a 2-core CPU; each script prints its own table. Pass names to run a
subset: `python bench/run_all.py e2e lora`.
"""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = {
    "data": ["bench_data.py", "all", "--repeats", "2", "--trl-python", sys.executable],
    "loss": ["bench_loss.py"],
    "attention": ["bench_loss.py", "--attention", "--repeats", "5"],
    "lora": ["bench_lora.py", "--tokens", "1024", "--repeats", "30"],
    "e2e": [
        "bench_e2e.py",
        "all",
        "--seconds",
        "100",
        "--warmup",
        "1",
        "--repeats",
        "2",
        "--examples",
        "2000",
    ],
}


def main() -> None:
    names = sys.argv[1:] or list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        sys.exit(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHES)}")
    for name in names:
        script, *args = BENCHES[name]
        print(f"== {name}: {script} {' '.join(args)}", flush=True)
        subprocess.run([sys.executable, str(HERE / script), *args], check=True)


if __name__ == "__main__":
    main()
