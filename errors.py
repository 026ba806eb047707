"""
How a user-facing script stops on bad input: one clear line on stderr, exit status 1, no traceback. Every script and
module that checks what a user gave imports die() from here. Not run by itself.
"""

import os
import re
import sys


def die(msg, every_rank=False):
    """Stop a user-facing script with one clear line on stderr and exit status 1. Text passed on from
    elsewhere (an exception, a file) loses its ANSI escapes and control characters and stays on one line. Under
    torchrun rank 0 alone says it and the others just stop, unless every_rank (a line each process must give)."""
    if os.environ.get("RANK", "0") != "0" and not every_rank:
        sys.exit(1)
    msg = re.sub(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-_]", "", str(msg))
    sys.exit("error: " + " ".join(re.sub(r"[\x00-\x1f\x7f]", " ", msg).split()))
