"""The first thing a worker process runs: die with the launcher, then import the rest.

``python -c "from dmtrec.parallel.lifeline import boot; boot()" PARENT_PID JOB OUT_DIR`` asks
the kernel to SIGKILL this process when its parent dies (``prctl(PR_SET_PDEATHSIG)``) and exits
at once if the parent is already gone (it died before the ``prctl``), *before* importing torch:
an import of torch and TorchRec takes seconds (a minute on a loaded machine), and a worker
whose launcher was killed meanwhile must not live on. Only the standard library is imported
here (and ``dmtrec``'s package ``__init__``, which is light).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent_pid: int | None = None) -> None:
    """SIGKILL this process when its parent dies (Linux; elsewhere a no-op); exit now if
    ``parent_pid`` is no longer the parent."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)


def boot() -> None:
    """Entry of a worker started by ``dmtrec.parallel.launch.start_ranks``."""
    parent, job, out_dir = sys.argv[1:4]
    die_with_parent(int(parent))
    from dmtrec.parallel.launch import child_main

    child_main(job, out_dir)


BOOT = "from dmtrec.parallel.lifeline import boot; boot()"
