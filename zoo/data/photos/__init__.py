"""TFDS builder for random crops of scikit-image's bundled photos (see the builder module)."""
