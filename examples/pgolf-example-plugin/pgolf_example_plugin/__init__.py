"""An example third-party pgolf plugin; the technique lives in ``leaky_relu2``."""

__version__ = "0.1.0"
