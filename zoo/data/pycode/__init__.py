"""TFDS builder for the running interpreter's standard-library source (see the builder module)."""
