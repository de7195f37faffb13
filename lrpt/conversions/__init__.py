"""Conversions: HF PEFT adapters, low-rank compression, base models (GGUF)."""
