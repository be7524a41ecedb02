"""dropup: Mixture-of-Experts models from dense checkpoints with Drop-Upcycling (ICLR 2025)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dropup")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+local"

from dropup.errors import UserError  # noqa: E402
from dropup.upcycle import upcycle  # noqa: E402

__all__ = ["UserError", "upcycle", "__version__"]
