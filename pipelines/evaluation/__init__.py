"""Evaluation of a model on texts: one full-depth pass (`passes`), sweeps and the oracle (`sweep`), the
confidence-bounded automatic knob (`thresholds`), wall-clock timing (`wallclock`), tables and plots
(`report`), and the training job's final evaluation (`final`). Imports only the shared modules and ee_model:
training and scoring both use it, it uses neither."""
