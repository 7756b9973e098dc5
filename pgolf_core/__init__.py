"""pgolf: parameter-golf recipes assembled from technique plugins and TOML stack files."""

__version__ = "0.1.0"
