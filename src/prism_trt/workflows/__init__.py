"""Whole workflows built from the library's layers (the `prism-trt demo` pipeline); the CLI's
commands only start them."""
