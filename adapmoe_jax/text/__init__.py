"""Text: the checkpoint's tokenizer and streaming detokenization."""

from adapmoe_jax.text.tokenizer import StreamDecoder, Tokenizer

__all__ = ["StreamDecoder", "Tokenizer"]
