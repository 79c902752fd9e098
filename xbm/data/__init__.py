"""Datasets, the m-per-class sampler, transforms and the Glyphs generator."""
