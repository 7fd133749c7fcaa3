"""``python -m green_callbacks.sinks SPOOL``: the sender process that ``MlflowSink`` starts."""

import contextlib
import os
import sys

# first, before its imports: the sender takes only the CPU time the training leaves free (see follower.lowest_autogroup)
if hasattr(os, "getsid") and os.getsid(0) == os.getpid():  # its own session's group, never the training's
    with contextlib.suppress(OSError), open("/proc/self/autogroup", "w") as _group:
        _group.write("19")

from green_callbacks.sinks.follower import main

sys.exit(main())
