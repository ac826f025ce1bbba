"""prism-trt: distributed Vision Transformer inference on edge boards with Prism segment means."""

__version__ = "0.1.0"
