"""dropup: Mixture-of-Experts models from dense checkpoints with Drop-Upcycling (ICLR 2025)."""

from dropup._version import __version__
from dropup.convert.upcycle import upcycle
from dropup.errors import UserError
from dropup.hub.config import ModelConfig
from dropup.model.io import load_model, save_model
from dropup.train.losses import load_balancing_loss

__all__ = ["ModelConfig", "UserError", "load_balancing_loss", "load_model", "save_model", "upcycle",
           "__version__"]
