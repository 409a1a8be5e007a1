"""`python -m merge_core …` from the repo root."""
import gc
import sys

from .cli import main

# Everything imported so far (torch's ~170k objects) lives until exit: freezing it keeps the collector from
# walking it again, in each full collection during the run and in the collections of interpreter shutdown
# (0.35–0.5 s of a bare `import torch` process's exit on a 2-core machine).
gc.freeze()
sys.exit(main())
