"""Export: turn a trained adapter into something that runs elsewhere.

merge (the adapter folded into the base weights, verified by comparing logits); exporter + gguf (one GGUF
file for llama.cpp, Ollama and LM Studio: the writer, with vocab and chat_templates, each family's tensors and
hyperparameters from lmtune.families; verified by loading it back: verify, llamacpp); ollama (the Modelfile).
Uses the data and training stages (the template and the run folder's files).
"""
