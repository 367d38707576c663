"""EfficientXpert, in the order the data flows (method.md):

statistics (the calibration pass) or recorder (statistics of the training forwards)
-> foresight (score and selection) -> pbs (Partial Brain Surgeon) -> prune (one pruning call:
score, update, merge, mask, re-init; baselines holds the Wanda, magnitude and SparseGPT scores)
-> schedule (the calls inside LoRA training; score_memory carries scores and masks between calls).
"""
