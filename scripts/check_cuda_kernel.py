#!/usr/bin/env python3
"""Compiles src/decode/softmax_topk.cu with NVRTC (as topk_cuda.rs does at run time) and, when
ptxas is available, assembles the PTX for a real GPU architecture. Needs no GPU: it checks that
the kernel tern ships compiles. NVRTC and ptxas come from PyPI:

    python3 -m venv /tmp/cudavenv
    /tmp/cudavenv/bin/pip install nvidia-cuda-nvrtc-cu12 nvidia-cuda-nvcc-cu12
    /tmp/cudavenv/bin/python scripts/check_cuda_kernel.py
"""
import ctypes
import glob
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import nvidia  # the PyPI CUDA packages' namespace

root = Path(nvidia.__path__[0])
libs = sorted(glob.glob(str(root / "cuda_nvrtc" / "lib" / "libnvrtc.so*")))
if not libs:
    sys.exit("libnvrtc not found: pip install nvidia-cuda-nvrtc-cu12")
nvrtc = ctypes.CDLL(libs[0])
src = (Path(__file__).resolve().parent.parent / "src" / "decode" / "softmax_topk.cu").read_bytes()
prog = ctypes.c_void_p()
assert nvrtc.nvrtcCreateProgram(ctypes.byref(prog), src, b"softmax_topk.cu", 0, None, None) == 0
arch = os.environ.get("ARCH", "compute_80")
opts = (ctypes.c_char_p * 1)(f"--gpu-architecture={arch}".encode())
rc = nvrtc.nvrtcCompileProgram(prog, 1, opts)
size = ctypes.c_size_t()
nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
log = ctypes.create_string_buffer(size.value)
nvrtc.nvrtcGetProgramLog(prog, log)
if log.value.strip():
    print(log.value.decode())
if rc != 0:
    sys.exit(f"NVRTC failed ({rc})")
nvrtc.nvrtcGetPTXSize(prog, ctypes.byref(size))
ptx = ctypes.create_string_buffer(size.value)
nvrtc.nvrtcGetPTX(prog, ptx)
print(f"NVRTC ({arch}): ok, {size.value} bytes of PTX")
ptxas = root / "cuda_nvcc" / "bin" / "ptxas"
if ptxas.exists():
    with tempfile.NamedTemporaryFile("wb", suffix=".ptx", delete=False) as f:
        f.write(ptx.value)
    sm = arch.replace("compute_", "sm_")
    r = subprocess.run([str(ptxas), f"-arch={sm}", "-v", f.name, "-o", os.devnull], capture_output=True, text=True)
    print(r.stdout + r.stderr)
    if r.returncode != 0:
        sys.exit("ptxas failed")
    print(f"ptxas ({sm}): ok")
