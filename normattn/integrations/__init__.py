"""Integrations of normattn into other libraries; each submodule imports its library on import.

* :mod:`normattn.integrations.transformers`: Hugging Face transformers attention implementations
  (install with ``pip install "normattn[hf]"``).
"""
