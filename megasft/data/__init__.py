"""SFT data path: tokenizers, chat templates, indexed datasets, packing, loaders."""
