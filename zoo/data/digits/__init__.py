"""TFDS builder for scikit-learn's 8x8 handwritten digits (see the builder module)."""
