"""Training for PixArt models of any size, and PixArt-nano: a tiny model trained here from scratch.

Modules: data (procedural captioned scenes and edge maps), tokenizer (word-level, HF-loadable), common (schedule,
EMA, text, model builders), losses (the PixArt objective), vae_train, pretrain (recipe 1), lcm_distill (recipe 2,
PixArt-δ LCM), controlnet_train (recipe 3, ControlNet-Transformer), caption_checker, evaluate, export (loader file
layouts) and build_nano (the one command that reproduces the shipped nano weights: `python -m train.build_nano` from
the repository root). A top-level package beside pixart_core, which it imports (the one schedule, null caption and
LCM scalings); nothing in pixart_core or pixart_nodes imports it, so the pack runs without it.
"""
