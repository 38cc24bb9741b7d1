"""Integrations with libraries whose models xtk runs in place (``xtk.integrations.hf``: Hugging Face transformers)."""
