"""The Python face of lmcompress (see `lmcompress/__init__.py`)."""
