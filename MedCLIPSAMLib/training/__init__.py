"""Training: CLIP fine-tuning (DHN-NCE), weak supervision, MedCLIPSeg adapters. Heavy imports stay inside functions."""
