from __future__ import annotations

import os
import sys

from . import cli

code = cli.main()
if cli.DISTRIBUTED_RUN_ENDED:
    # A torchrun rank whose results are written and whose process group is gone leaves without the
    # interpreter's teardown: on a loaded 2-core machine a rank once aborted there ("terminate called
    # without an active exception", exit -6) after saving, which torchrun reports as a failed job.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
