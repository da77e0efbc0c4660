"""Code shared by fedserver and fedclient: wire codec, models, data, config."""

__version__ = "0.1.0"
