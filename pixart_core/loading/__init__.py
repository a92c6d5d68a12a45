"""Loading: reading model files into the core's modules. Checkpoint formats and detection (checkpoint.py,
checkpoint_formats.py), T5 file reading (t5_loading.py), the Hugging Face hub lookup (hub.py) and where the shipped
PixArt-nano files are (bundled.py). The modules that make an image stay at the top of pixart_core."""
