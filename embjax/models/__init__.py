"""Flax backbones, one file per family, and the name -> spec registry."""
