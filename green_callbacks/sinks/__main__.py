"""``python -m green_callbacks.sinks SPOOL``: the sender process that ``MlflowSink`` starts."""

import contextlib
import logging
import os
import sys

from green_callbacks.sinks.follower import main

code = main()
# its work is done (every record MLflow confirmed, or kept in its spool; every call synchronous, no atexit work of
# MLflow's pending): it ends without the interpreter's teardown of MLflow's modules, 1.2 s of CPU at every end
logging.shutdown()
for stream in (sys.stdout, sys.stderr):
    with contextlib.suppress(OSError, ValueError, AttributeError):  # (a closed or missing stream)
        stream.flush()
os._exit(code if isinstance(code, int) else 1)
