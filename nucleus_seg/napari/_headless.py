"""An X display for OpenGL without a screen: Qt's offscreen platform (QT_QPA_PLATFORM=offscreen) creates
OpenGL contexts only through an X server's GLX, and napari's canvas needs one. Used by the tests and by
``scripts/napari_screenshot.py``; windows still go to the offscreen platform, so nothing is shown."""

from __future__ import annotations

import ctypes
import os
import select
import shutil
import signal
import subprocess
import sys
import time

PR_SET_PDEATHSIG = 1  # linux/prctl.h


class NoDisplayError(RuntimeError):
    """No DISPLAY and no Xvfb to make one."""


def _end_with_parent() -> None:
    """In the child: SIGTERM when the process that started it ends (Linux)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def ensure_display() -> str:
    """The current DISPLAY, else a virtual one (Xvfb) started for the rest of this process.

    The server ends when this process does, not before: Qt keeps its X connection until the interpreter
    exits, and Xlib ends a process whose server went first with status 1.
    """
    if os.environ.get("DISPLAY"):
        return os.environ["DISPLAY"]
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        raise NoDisplayError("napari's canvas needs OpenGL, which Qt's offscreen platform takes from an X server: "
                             "install Xvfb (Debian: apt-get install xvfb; scripts/setup_env.sh does it as root)")
    # -displayfd: Xvfb picks a free display and writes its number when ready; -noreset: it stays as it is
    # when its last client leaves (a reset would write to -displayfd again)
    read, write = os.pipe()
    proc = subprocess.Popen([xvfb, "-displayfd", str(write), "-noreset", "-screen", "0", "1600x1200x24",
                             "-nolisten", "tcp"], pass_fds=(write,), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, preexec_fn=_end_with_parent)
    os.close(write)
    number = _read_line(read, timeout=20.0)
    os.close(read)  # only after the whole line: Xvfb ends itself if the newline finds the pipe closed
    if not number:
        proc.kill()
        raise NoDisplayError("Xvfb did not start within 20 s")
    os.environ["DISPLAY"] = f":{number}"
    return os.environ["DISPLAY"]


def _read_line(fd: int, timeout: float) -> str:
    """One line from ``fd`` (Xvfb may write the number and its newline separately); "" on timeout or EOF."""
    data, deadline = b"", time.monotonic() + timeout
    while not data.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(fd, 16) if ready else b""
        if not chunk:
            return ""
        data += chunk
    return data.decode().strip()

