"""One YAML per paper: citation, protocol and published numbers, shipped as ``kdlab.papers``."""
