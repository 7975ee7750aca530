"""A site's model work: the base model, LoRA attach and state, adapter I/O, the local training
loop, evaluation and the Hugging Face Trainer route."""
