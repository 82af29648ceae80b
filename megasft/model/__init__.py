"""The Llama-family model (one definition for every layout), attention backends, presets."""
