"""unmask: text, code and MIDI generation with one masked-diffusion model."""

__version__ = "0.1.0"
