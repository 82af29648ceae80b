"""Hugging Face interop for every family (megasft.model.families): the parameter name/split table (names), config.json <-> ModelConfig
(config), and safetensors directories on disk (io)."""
