"""Data side of jaxsft: chat rendering with loss masks, readers, packing, the grain pipeline.

`jaxsft.data.render(tokenizer, example, max_length=None)` is the public entry point; the
pipeline (`jaxsft.data.pipeline`, which imports grain) is imported on use.
"""

from jaxsft.data.chat import render

__all__ = ["render"]
