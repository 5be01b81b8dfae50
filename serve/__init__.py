"""Serving: the OpenAI-compatible chat-completions server that splits answers into observation, reasoning and answer."""
