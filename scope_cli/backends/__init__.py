"""Engines behind the stages: generation (vLLM, transformers), math verification, PRMs, guides."""
