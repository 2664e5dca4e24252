"""Generic training: train state, the jitted step, the loop (checkpoints, metrics, hooks),
`fit`, the optimizer and resumable batchers. Knows nothing of refusal or teachers."""
