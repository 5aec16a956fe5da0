"""Inference: ask a model questions with the template it was trained with.

load (model + adapter + template, stop and padding ids), generate (one question streamed, or many
batched), batching (a continuous-batching worker), chat (the terminal conversation), serve (the
OpenAI-compatible HTTP server). Uses the data stage and the shared modules.
"""
