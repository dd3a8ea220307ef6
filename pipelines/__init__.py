"""The Ray pipelines around `ee_model`, grouped by what they serve.

- `training/`: Ray Train stages, the Ray Tune search, the training job's pipeline.
- `evaluation/`: full-depth passes, sweeps, the oracle, the automatic knob, wall-clock timing, reports.
- `scoring/`: the batch-scoring job: Ray Data actor pool, incremental kill-safe outputs, calibration.
- shared modules here: `config` (the one typed config), `data`, `bbc`, `paths`, `errors`, `model_source`,
  `tracking`, `pyfunc_model`.

Imports run one way (enforced by tests/test_layers.py): jobs -> training | scoring -> evaluation -> the shared
modules -> ee_model. Training and scoring never import each other; evaluation imports neither; the shared
modules import none of the three folders; nothing in pipelines imports jobs, and ee_model imports nothing
here.
"""
