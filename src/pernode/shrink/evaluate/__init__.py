"""Quality measurements of a (possibly quantized) model on real text."""
