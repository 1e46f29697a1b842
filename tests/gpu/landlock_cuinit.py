#!/usr/bin/env python3
"""Landlock as the `high` worker applies it (host/src/sandbox/access.rs), then `cuInit`: finds
what the driver needs that the ruleset refuses, on a GPU machine with no strace (ctypes only).

    landlock_cuinit.py [PATH | w:PATH]...

PATH adds a read rule, w:PATH full access. Prints each driver call's result: 0 when it works, 304
(CUDA_ERROR_OPERATING_SYSTEM) when the ruleset stops it; a context is made too (cuInit alone
need not open the GPU's node). On the lent H200 (2026-12-04): 304 with
every path readable, 0 with `w:/proc/self/task` (CUDA names its threads through their `comm`).
The product's ruleset now has that rule (`access::own_thread_paths`); its seccomp allow-list
is not reproduced here."""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
class RA(ctypes.Structure):
    _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]
class PB(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed", ctypes.c_uint64), ("fd", ctypes.c_int32)]
abi = libc.syscall(444, None, 0, 1)
ALL = (1 << 16) - 1
READ = 1 | 4 | 8
attr = RA(ALL, 0, 0)
rs = libc.syscall(444, ctypes.byref(attr), ctypes.sizeof(attr), 0)
assert rs >= 0, ctypes.get_errno()
def rule(path, access):
    if not os.path.exists(path):
        return
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    if not os.path.isdir(path):
        access &= 1 | 2 | 4 | 16384 | 32768
    pb = PB(access, fd)
    r = libc.syscall(445, rs, 1, ctypes.byref(pb), 0)
    assert r == 0, (path, ctypes.get_errno())
    os.close(fd)
system = ["/usr", "/lib", "/lib64", "/etc/ld.so.cache", "/proc", "/sys/devices/system/cpu", "/sys/fs/cgroup",
          "/dev/urandom", "/dev/zero", "/proc/driver/nvidia", "/sys/module/nvidia", "/sys/bus/pci", "/sys/devices",
          "/opt", sys.prefix, os.path.dirname(os.__file__)]
for p in system + [a for a in sys.argv[1:] if not a.startswith('w:')]:
    rule(p, READ)
for a in sys.argv[1:]:
    if a.startswith('w:'):
        rule(a[2:], ALL)
rule("/tmp", ALL)
rule("/dev/null", 2 | 4)
# Every GPU node there is (a container may hold /dev/nvidia5 alone), as the product grants its
# GPU's node (host/src/sandbox/gpu.rs).
gpus = sorted(n for n in os.listdir("/dev") if n.startswith("nvidia") and n[6:].isdigit())
for n in ["/dev/" + g for g in gpus] + ["/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools"]:
    rule(n, 2 | 4 | 32768)
libc.prctl(38, 1, 0, 0, 0)
assert libc.syscall(446, rs, 0) == 0, ctypes.get_errno()
l = ctypes.CDLL("libcuda.so.1")
init = l.cuInit(0)
# cuInit alone need not open the GPU's node: a context does (what the worker's first step makes).
dev, ctx = ctypes.c_int(), ctypes.c_void_p()
got = l.cuDeviceGet(ctypes.byref(dev), 0) if init == 0 else None
retained = l.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev) if got == 0 else None
print("abi", abi, "nodes", gpus, "extra", sys.argv[1:] or "-", "cuInit", init,
      "cuDeviceGet", got, "cuDevicePrimaryCtxRetain", retained, flush=True)
