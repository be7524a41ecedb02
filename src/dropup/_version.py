"""The installed package's version, in a leaf module so that any module can import it."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dropup")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+local"
