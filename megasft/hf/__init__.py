"""Hugging Face Llama interop: the parameter name/split table (names), config.json <-> ModelConfig
(config), and safetensors directories on disk (io)."""
