"""Evaluation: harmful score with a recorded judge (`judging` builds the configured one), finetuning
accuracy as the peer harness scores it, text generation, the report (eval.json, report.md) and its
figures, and the numbers the notebook shows (`analysis`).
"""
