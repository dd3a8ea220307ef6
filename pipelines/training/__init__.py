"""Training: the stages on Ray Train (`stages`, `steps`, `worker_loop`, `trainer`), the learning-rate search
(`tune`) and the job's pipeline (`pipeline`). May import `pipelines.evaluation` and the shared modules; never
`pipelines.scoring`."""
