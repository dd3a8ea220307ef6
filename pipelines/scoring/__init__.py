"""Batch scoring: the job's Ray Data pipeline (`pipeline`), the actor that scores a batch (`scorer`),
kill-safe incremental outputs (`incremental`) and label-free calibration (`calibration`). May import
`pipelines.evaluation` and the shared modules; never `pipelines.training`."""
