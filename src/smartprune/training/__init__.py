"""Training loops: recovery of a compressed model (`recover`, with its checkpoint, data-parallel and
FSDP helpers and the one learning-rate schedule) and pretraining a small GPT-2 (`pretrain`)."""
