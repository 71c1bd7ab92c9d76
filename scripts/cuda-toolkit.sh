#!/usr/bin/env bash
# A CUDA toolkit from PyPI wheels, enough to compile the `cuda` feature on a machine with
# no GPU and no system CUDA: nvcc (with cicc and ptxas), the headers, and the libraries
# cudarc links against. Nothing here is needed to build or test the CPU package.
#
#   bash scripts/cuda-toolkit.sh          # makes .cuda/ (once) and prints its root
#   eval "$(bash scripts/cuda-toolkit.sh --env)"   # CUDA_HOME, PATH, LIBRARY_PATH, ...
#
# The wheels are pinned to CUDA 13.0, the version of the driver (580) on the GPU machines
# this project is tested on: PTX from a newer nvcc than the driver would not load.
# libcuda.so comes with the driver, not with any wheel, so the linker gets a stub with the
# driver API's names and the real library's soname; at run time the driver's own
# libcuda.so.1 is loaded in its place.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD/.cuda"
tk="$root/toolkit"

if [ ! -x "$tk/bin/nvcc" ] || [ ! -e "$tk/lib64/libcuda.so" ]; then
  echo "cuda-toolkit: installing CUDA 13.0 wheels into $root/venv" >&2
  python3 -m venv "$root/venv"
  "$root/venv/bin/pip" install -q --disable-pip-version-check --no-deps \
    'nvidia-cuda-nvcc==13.0.88' 'nvidia-nvvm==13.0.88' 'nvidia-cuda-crt==13.0.88' \
    'nvidia-cuda-runtime==13.0.96' 'nvidia-cuda-cccl==13.0.85' 'nvidia-cuda-nvrtc==13.0.88' \
    'nvidia-cublas==13.0.2.14' 'nvidia-curand==10.4.5.25' >&2
  wheels="$("$root/venv/bin/python" -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13"))')"
  rm -rf "$tk"
  mkdir -p "$tk/lib64"
  # nvcc finds cicc and the crt headers relative to itself
  for d in bin include nvvm; do ln -s "$wheels/$d" "$tk/$d"; done
  for f in "$wheels"/lib/*.so.*; do
    b="$(basename "$f")"
    ln -sf "$f" "$tk/lib64/$b"
    ln -sf "$f" "$tk/lib64/${b%%.so.*}.so"
  done
  # the driver stub: every cu* function cuda.h declares, and the _v2/_v3 names its
  # macros map them to
  {
    grep -ohE '\bCUresult CUDAAPI (cu[A-Za-z0-9_]+)\(' "$tk/include/cuda.h" | sed -E 's/.* (cu[A-Za-z0-9_]+)\(/\1/'
    grep -ohE '^ *#define +cu[A-Za-z0-9_]+ +cu[A-Za-z0-9_]+' "$tk/include/cuda.h" | awk '{print $3}'
  } | sort -u | awk '{print "void " $1 "(void) {}"}' >"$root/libcuda_stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$tk/lib64/libcuda.so" "$root/libcuda_stub.c"
fi

if [ "${1:-}" = "--env" ]; then
  echo "export CUDA_HOME='$tk' CUDA_PATH='$tk'"
  echo "export PATH='$tk/bin':\"\$PATH\""
  echo "export LIBRARY_PATH='$tk/lib64'\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
  echo "export CUDARC_CUDA_VERSION=13000"
  # Hopper (H100, H200) unless the caller names another compute capability
  echo "export CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-90}"
else
  echo "$tk"
fi
