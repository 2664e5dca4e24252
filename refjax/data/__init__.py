"""Data: named sources (local shared files, HF hub, tfds) and the task table, the Example record,
prompt templates, the run's example sets (user mixture, alignment set, probe and calibration
prompts) and their encoding into fixed-shape arrays.
"""
