"""wit-builder: build a WIT-style (CLIP) image-text dataset and train CLIP on it.

Example:
    >>> import wit_builder
    >>> isinstance(wit_builder.__version__, str)
    True
"""

__version__ = "0.1.0"
