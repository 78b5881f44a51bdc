#!/usr/bin/env bash
# Download into DIR (default .whl, ignored by git) the Python 3.12 / x86-64 wheels that an offline GPU
# machine with only torch, transformers, peft, accelerate and triton lacks for bench/gpu/run.py. Run it
# from the repository root on a machine that reaches PyPI; the device run carries DIR (`carry: [".whl"]`).
#
#   transformers, peft            newer than the machine's (tunesmith needs transformers >= 5.18, peft >= 0.19)
#   datasets, dill, multiprocess  tunesmith's data pipeline
#   trl, liger-kernel             the peers
#   bitsandbytes                  4-bit QLoRA
#   deepspeed (+ hjson, pydantic) ZeRO-3; PyPI has only its source, so it is built here into a pure-Python
#                                 wheel (DS_BUILD_OPS=0: no compiled ops, none is needed at ZeRO-3 without
#                                 offload). --without-deepspeed leaves it out (the dist step then skips ZeRO-3).
#
# 65.3 MB with deepspeed (60.4 MB without): with the working tree (1.4 MB) just under the 64 MiB
# (67.1 MB) the device tool carries; if it refuses, --without-deepspeed.
set -euo pipefail
dir=.whl
deepspeed=1
for arg in "$@"; do
  case "$arg" in
    --without-deepspeed) deepspeed=0 ;;
    *) dir=$arg ;;
  esac
done
mkdir -p "$dir"
py=${PYTHON:-python3}
download() {
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d "$dir" "$@"
}
for p in transformers==5.24.0 peft==0.21.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 trl==1.16.0 \
         liger-kernel==0.8.5 bitsandbytes==0.50.2; do
  download "$p"
done
if [ "$deepspeed" = 1 ]; then
  # pydantic pins its pydantic-core exactly: take both versions from one resolution
  download hjson==3.1.0 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 \
    pydantic==2.14.4 pydantic-core==2.50.5
  DS_BUILD_OPS=0 "$py" -m pip wheel -q --no-deps --no-build-isolation -w "$dir" deepspeed==0.19.8
fi
du -sh "$dir"
