"""Helpers for the tests that run only where vLLM is installed (the `.venv-vllm` environment)."""
