"""`python -m merge_core …` from the repo root."""
import sys

from .cli import main

sys.exit(main())
