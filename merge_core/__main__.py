"""`python -m merge_core …` from the repo root."""
import gc
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
sys.exit(main())
