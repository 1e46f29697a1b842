#!/usr/bin/env python3
"""Compiles the engine's CUDA sources with NVRTC, as the engine does at run time (behind the
prelude every source gets, NVRTC's default architecture, fast math), and fails on any error or
warning: `nvrtc_check.py LIBNVRTC SOURCE... [--prelude FILE] [--arch compute_XX]`. Needs no GPU."""
import ctypes
import sys


def compile_source(nvrtc, path, arch, prelude):
    src = prelude + b"\n" + open(path, "rb").read()
    prog = ctypes.c_void_p()
    check(nvrtc, nvrtc.nvrtcCreateProgram(ctypes.byref(prog), src, path.encode(), 0, None, None), path)
    opts = [b"--use_fast_math"] + ([f"--gpu-architecture={arch}".encode()] if arch else [])
    arr = (ctypes.c_char_p * len(opts))(*opts)
    status = nvrtc.nvrtcCompileProgram(prog, len(opts), arr)
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(prog, log)
    text = log.value.decode(errors="replace").strip()
    if status != 0 or "warning" in text:
        print(f"{path} ({arch}):\n{text}")
        return False
    print(f"{path}: compiles with NVRTC for {arch or 'its default architecture'}")
    return True


def check(nvrtc, status, what):
    if status != 0:
        nvrtc.nvrtcGetErrorString.restype = ctypes.c_char_p
        sys.exit(f"{what}: {nvrtc.nvrtcGetErrorString(status).decode()}")


def main():
    args = sys.argv[1:]
    arch, prelude = None, b""
    if "--arch" in args:
        i = args.index("--arch")
        arch = args[i + 1]
        del args[i : i + 2]
    if "--prelude" in args:
        i = args.index("--prelude")
        prelude = open(args[i + 1], "rb").read()
        del args[i : i + 2]
    nvrtc = ctypes.CDLL(args[0])
    ok = all([compile_source(nvrtc, p, arch, prelude) for p in args[1:]])
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
