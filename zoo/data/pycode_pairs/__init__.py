"""TFDS builder for (code, docstring) pairs of the standard library's functions (see the builder module)."""
