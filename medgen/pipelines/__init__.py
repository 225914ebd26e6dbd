"""The jobs users run, as thin orchestrators over data, models, training and evaluation.

synthesize (checkpoint -> BIDS-derivative NIfTI folder), cv (the cross-validated augmentation
experiment), evaluate_synth (synthesis quality of a checkpoint), segment (parallel-decoder VAE on
scenes or volumes), report (the cv-evaluate result files). Each CLI command calls one of them.
"""
