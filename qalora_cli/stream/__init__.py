"""Streaming generation and long-text scoring with attention sinks (StreamingLLM)."""
