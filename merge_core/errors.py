"""User-facing errors: each message is one clear line that names the file, module or option at fault."""
import math
from typing import Iterable

INTERRUPTED = "error: interrupted; no output was written"  # the CLI's line for Ctrl-C (exit 130)


class MergeCoreError(Exception):
    """Base class; the CLI prints `error: <message>` and exits 2."""


class InputFileError(MergeCoreError):
    """A file is missing, empty, truncated, corrupt or holds something other than tensors."""


class FormatError(MergeCoreError):
    """Tensors are readable but their key layout or shapes are not a known adapter format."""


class ShapeMismatchError(MergeCoreError):
    """The same module has incompatible shapes across inputs (e.g. SD1.5 with SDXL)."""


class DoraError(MergeCoreError):
    """DoRA modules cannot be merged linearly without an explicit choice."""


class OutputExistsError(MergeCoreError):
    """The output exists and overwrite was not requested."""


class OutputWriteError(MergeCoreError):
    """The output could not be written (disk full, read-only folder, no permission, file in use); `failure` says
    which file and why, without what that left on disk."""

    def __init__(self, failure: str, outcome: str = "Nothing was changed."):
        super().__init__(f"{failure} {outcome}")
        self.failure = failure


class UnsafePathError(MergeCoreError):
    """A path would leave the folder it must stay in."""


class NonFiniteError(MergeCoreError):
    """An input tensor or an option holds NaN or an infinity."""


def finite_numbers(values: Iterable[float], what: str) -> list[float]:
    """The values as floats, or a NonFiniteError naming `what` and the first NaN/infinite one."""
    out = [float(v) for v in values]
    bad = next((i for i, v in enumerate(out) if not math.isfinite(v)), None)
    if bad is not None:
        which = f"value {bad + 1} of {len(out)} is" if len(out) > 1 else "got"
        raise NonFiniteError(f"{what} must be finite, {which} {out[bad]}")
    return out
