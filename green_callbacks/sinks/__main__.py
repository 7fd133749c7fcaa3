"""``python -m green_callbacks.sinks SPOOL``: the sender process that ``MlflowSink`` starts."""

import sys

from green_callbacks.sinks.follower import main

sys.exit(main())
