"""Keep a thread's alternate signal stack valid around OpenVINO calls (Linux).

OpenVINO's CPU plugin gives every compiled model its own alternate signal stack (sized for AMX signal
frames): the constructor installs a fresh ``mmap``-ed stack and remembers the one it replaced, the destructor
puts that one back and unmaps its own. When two compiled models of one thread are released in the order they
were created (not the reverse), the second one puts back the first one's stack, which is already unmapped. The
thread is then left with an alternate stack that points at nothing, and the next signal whose handler runs on
it kills the process with SIGSEGV. Python installs its handlers that way (``SA_ONSTACK``), so this happens on
Ctrl-C, on the SIGCHLD that PyTorch's DataLoader handles, or on any ``signal.signal`` handler. Found in our own
test suite: a training test died that way ~500 tests after an OpenVINO test had released its fp32 and bf16
models.

:func:`openvino_signal_stack` wraps every OpenVINO call of ours that compiles models (the bench backend,
``export``, NNCF quantization). Before and after the call it installs a stack of this module's own. The stack
is larger than OpenVINO's and is never freed. So every compiled model remembers this stack as the one to put
back, and releasing models in any order leaves the thread with valid memory. Elsewhere (not Linux) it does
nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
import threading
from collections.abc import Iterator

_SS_DISABLE = 2
_AT_MINSIGSTKSZ = 51  # auxv entry: the kernel's minimum signal frame size on this CPU (AVX-512, AMX)
_EXTRA = 64 * 1024  # room for the handler's own frames on top of the kernel's signal frame


class _StackT(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


_local = threading.local()  # this thread's stack buffer: kept for the life of the thread, never reused
_libc: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL | None:
    global _libc
    if _libc is None and sys.platform.startswith("linux"):
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.getauxval.restype = ctypes.c_ulong
            _libc.getauxval.argtypes = [ctypes.c_ulong]
        except (OSError, AttributeError):
            _libc = None
    return _libc


def current_stack() -> tuple[int, int, int] | None:
    """This thread's alternate signal stack as (address, size, flags); None where it cannot be read."""
    libc = _lib()
    if libc is None:
        return None
    st = _StackT()
    if libc.sigaltstack(None, ctypes.byref(st)) != 0:
        return None
    return int(st.ss_sp or 0), int(st.ss_size), int(st.ss_flags)


def install_own_stack() -> bool:
    """Make this module's stack (allocated once per thread) this thread's alternate signal stack.

    Returns False where that is not possible (not Linux, no libc, or the thread is running on its alternate
    stack right now, which only a signal handler does)."""
    libc = _lib()
    if libc is None:
        return False
    buf = getattr(_local, "buf", None)
    if buf is None:
        size = max(int(libc.getauxval(_AT_MINSIGSTKSZ)), 2048) + _EXTRA
        buf = _local.buf = ctypes.create_string_buffer(size)
    addr = ctypes.addressof(buf)
    cur = current_stack()
    if cur is not None and cur[0] == addr and not cur[2] & _SS_DISABLE:
        return True
    st = _StackT(ctypes.c_void_p(addr), 0, ctypes.sizeof(buf))
    return libc.sigaltstack(ctypes.byref(st), None) == 0


@contextlib.contextmanager
def openvino_signal_stack() -> Iterator[None]:
    """Run OpenVINO calls that compile (or release) models with this thread's alternate signal stack kept
    valid: every compiled model created inside remembers this module's stack as the one to put back."""
    install_own_stack()
    try:
        yield
    finally:
        install_own_stack()  # models released inside (NNCF's) may have put back an unmapped stack


__all__ = ["current_stack", "install_own_stack", "openvino_signal_stack"]
