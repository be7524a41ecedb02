"""dropup: Mixture-of-Experts models from dense checkpoints with Drop-Upcycling (ICLR 2025)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dropup")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+local"

from dropup.errors import UserError  # noqa: E402
from dropup.config import ModelConfig  # noqa: E402
from dropup.hf_io import load_model, save_model  # noqa: E402
from dropup.losses import load_balancing_loss  # noqa: E402
from dropup.upcycle import upcycle  # noqa: E402

__all__ = ["ModelConfig", "UserError", "load_balancing_loss", "load_model", "save_model", "upcycle",
           "__version__"]
