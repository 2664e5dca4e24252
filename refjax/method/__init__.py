"""The paper as pure functions: refusal feature, layer choice, losses, teacher and student
objectives, the table of methods, and the filter's calibration."""
