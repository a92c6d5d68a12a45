"""Loading: reading model files into the core's modules. Checkpoint formats and detection (checkpoint.py,
checkpoint_formats.py), T5 files (t5_loading.py), VAE files (vae_files.py), ControlNet files (controlnet_files.py),
the HED detector's file (hed_files.py), the Hugging Face hub lookup (hub.py) and where the shipped PixArt-nano files
are (bundled.py). The modules that make an image stay at the top of pixart_core and never import this package."""
