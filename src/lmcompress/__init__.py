"""lmcompress: make transformer language models small and fast, and measure it."""

__version__ = "0.1.0"
