"""`python -m merge_core …` from the repo root."""
import gc
import os
import sys

from .errors import INTERRUPTED

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while torch is imported (a second or two)
    print(INTERRUPTED, file=sys.stderr)
    sys.exit(130)

# Everything imported so far (torch's ~170k objects) lives until exit: freezing it keeps the collector from
# walking it again, in each full collection during the run and in the collections of interpreter shutdown
# (0.35–0.5 s of a bare `import torch` process's exit on a 2-core machine).
gc.freeze()
code = main()
if code >= 128:  # stopped by a signal: the temp files are gone; leave without joining worker threads, one of
    sys.stdout.flush()  # which the interrupt may have caught half-registered (the exit would then wait forever)
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
