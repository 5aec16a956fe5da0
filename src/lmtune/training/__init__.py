"""Training: `train(config)` fine-tunes with LoRA around the transformers Trainer and saves the adapter.

train (the workflow), loss (answer-only loss with a fused output head), checkpoints (interrupt and
resume), distributed (batch arithmetic and sharded saving under torchrun/accelerate), quantization
(QLoRA), plot (the loss curve). Uses the data stage; never inference or evaluation: the end-of-run
validation report is run by train()'s callers.
"""
