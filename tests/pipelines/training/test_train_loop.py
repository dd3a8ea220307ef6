"""The worker loop in Ray Train's local mode (num_workers=0) on a tiny model, and the plain step functions."""

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from ray.data.dataset import MaterializedDataset

from ee_model import EarlyExitClassifier
from pipelines.config import DataConfig, JointConfig, ResourcesConfig, Stage1Config
from pipelines.data import load_labeled_splits
from pipelines.evaluation.passes import exit_logits, per_layer_accuracy
from pipelines.training.features import FeatureStore, cached_features, read_features, training_features
from pipelines.training.pipeline import stage_datasets, total_steps
from pipelines.training.stages import STAGES
from pipelines.training.steps import train_step
from pipelines.training.trainer import build_trainer
from pipelines.training.worker_loop import MODEL_SUBDIR, WorkerConfig
from tests.conftest import random_texts, unlabeled_table


def mlflow_run(tmp_path):
    """A real sqlite-backed MLflow store and a run the worker logs into; returns (uri, run_id)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("local"))
    return uri, run.info.run_id


def metric_history(uri, run_id, key):
    from mlflow.tracking import MlflowClient

    return [(m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key)]


def fit_stage(
    stage, splits, encoder_dir, tmp_path, init=None, tracking=(None, None), epochs=2, **stage_overrides
):
    from pipelines.config import load_train_config

    config = load_train_config(
        overrides={
            "data": {"train_path": "unused", "unlabeled_path": ""},
            "resources": {"storage_path": str(tmp_path / "ray")},
        }
    )
    stage_config = STAGES[stage].config_type(
        learning_rate=5e-3 if stage != "stage2" else 1e-2,
        epochs=epochs,
        batch_size_per_worker=16,
        checkpoint_every_steps=5,
        **stage_overrides,
    )
    if STAGES[stage].freezes_backbone:  # as the job runs stage 2: students on cached features
        stores, rows, _ = cached_features(splits, init, config)
        datasets = {name: read_features(store) for name, store in stores.items()}
    else:
        datasets, rows = stage_datasets(splits)
    worker = WorkerConfig(
        stage=stage,
        stage_config=vars(stage_config),
        labels=splits.labels,
        encoder=encoder_dir,
        model_options={"variant": "count" if stage == "joint" else "kl", "max_length": 32},
        total_steps=total_steps(rows, stage_config, 1),
        init_checkpoint=init,
        tracking_uri=tracking[0],
        mlflow_run_id=tracking[1],
    )
    resources = ResourcesConfig(num_workers=0, storage_path=str(tmp_path / "ray"), max_failures=0)
    return build_trainer(worker, datasets, resources, name=f"local-{stage}").fit()


def test_stage1_in_local_mode_reports_and_logs(ray_local, labeled_parquet, tiny_encoder_dir, tmp_path):
    splits = load_labeled_splits(DataConfig(train_path=labeled_parquet))
    tracking = mlflow_run(tmp_path)
    fit_stage("stage1", splits, tiny_encoder_dir("bert", num_layers=3), tmp_path, tracking=tracking)
    scores = metric_history(*tracking, "stage1_dev_score")
    # every 5 global steps + each epoch end (168 rows / 16 per step: 11 steps an epoch)
    assert [step for step, _ in scores] == [5, 10, 11, 15, 20, 22]
    assert len(metric_history(*tracking, "stage1_dev_accuracy_layer_3")) == 6
    assert len(metric_history(*tracking, "stage1_loss")) == 22  # per-step loss: 11 steps x 2 epochs
    assert max(v for _, v in scores) > 0.6  # the separable task is learned


def test_stage2_in_local_mode_keeps_the_teacher_and_trains_students(
    ray_local, labeled_parquet, tiny_encoder_dir, tmp_path
):
    from ray.train import Checkpoint

    splits = load_labeled_splits(DataConfig(train_path=labeled_parquet))
    torch.manual_seed(0)
    start = EarlyExitClassifier.from_encoder(
        tiny_encoder_dir("bert", num_layers=3), labels=splits.labels
    ).train()
    # a teacher that has learned the task (plain stage-1 steps): the students start near chance and must move
    # towards it (an untrained teacher can predict one class everywhere; students copying it never change
    # accuracy)
    texts = splits.train["text"].to_pylist()
    labels = [splits.labels.index(label) for label in splits.train["label"].to_pylist()]
    optimizer = torch.optim.AdamW(start.parameters(), lr=5e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    for _ in range(3):
        for i in range(0, len(texts), 16):
            batch = {"text": texts[i : i + 16], "label_id": labels[i : i + 16]}
            train_step(
                start,
                batch,
                STAGES["stage1"],
                STAGES["stage1"].loss(Stage1Config()),
                optimizer,
                scheduler,
                torch.device("cpu"),
            )
    start.eval().save_pretrained(tmp_path / "init" / MODEL_SUBDIR)
    tracking = mlflow_run(tmp_path)
    fit_stage(
        "stage2",
        splits,
        "unused",
        tmp_path,
        init=Checkpoint.from_directory(str(tmp_path / "init")),
        tracking=tracking,
    )
    teacher = {v for _, v in metric_history(*tracking, "stage2_dev_accuracy")}
    student = [v for _, v in metric_history(*tracking, "stage2_dev_accuracy_layer_1")]
    assert len(teacher) == 1, "the teacher changed during stage 2"
    assert len(student) == 6 and len(set(student)) > 1, "the students did not train"
    kl = [v for _, v in metric_history(*tracking, "stage2_loss")]
    assert sum(kl[-5:]) < sum(kl[:5])  # distillation loss goes down


def stage1_checkpoint(splits, tiny_encoder_dir, tmp_path):
    from ray.train import Checkpoint

    torch.manual_seed(0)
    model = EarlyExitClassifier.from_encoder(tiny_encoder_dir("bert", num_layers=3), labels=splits.labels)
    model.save_pretrained(tmp_path / "init" / MODEL_SUBDIR)
    return Checkpoint.from_directory(str(tmp_path / "init"))


def store_config(tmp_path, **data):
    from pipelines.config import load_train_config

    return load_train_config(
        overrides={
            "data": {"train_path": "unused", "unlabeled_path": "", **data},
            "stage2": {"feature_store": str(tmp_path / "store"), "feature_dtype": "float32"},
        }
    )


def part_times(store):
    return {name: (store.path / name).stat().st_mtime_ns for name in (p.name for p in store.parts)}


def test_the_feature_store_is_written_once_and_reused(ray_local, labeled_parquet, tiny_encoder_dir, tmp_path):
    splits = load_labeled_splits(DataConfig(train_path=labeled_parquet))
    init = stage1_checkpoint(splits, tiny_encoder_dir, tmp_path)
    config = store_config(tmp_path)
    stores, rows, metrics = cached_features(splits, init, config)
    store = stores["train"]
    assert store.complete and stores["dev"].complete and store.path.parent == tmp_path / "store"
    features = read_features(store).take_all()
    assert len(features) == rows == splits.train.num_rows
    assert features[0]["student_features"].shape == (2, 32) and features[0]["teacher_logits"].shape == (3,)
    assert sorted(f["label_id"] for f in features) == sorted(
        splits.labels.index(label) for label in splits.train["label"].to_pylist()
    )
    assert read_features(stores["dev"]).count() == splits.dev.num_rows
    # what Ray Train reads: held in the object store when small, streamed from the files when not
    assert isinstance(training_features(store), MaterializedDataset)
    streamed = training_features(store, memory_share=0.0)
    assert not isinstance(streamed, MaterializedDataset) and streamed.count() == rows
    written = part_times(store)
    again, _, _ = cached_features(splits, init, config)  # same weights and corpus: nothing extracted
    assert again["train"].path == store.path and part_times(again["train"]) == written
    other = dataclasses.replace(config, stage2=dataclasses.replace(config.stage2, feature_dtype="float16"))
    assert cached_features(splits, init, other)[0]["train"].path != store.path
    per_row = 2 * 32 * 4 + 3 * 4 + 8
    assert metrics["feature_store_bytes"] == (splits.train.num_rows + splits.dev.num_rows) * per_row


def write_corpus(folder, sizes, seed=1):
    folder.mkdir(exist_ok=True)
    for i, n in enumerate(sizes):
        pq.write_table(unlabeled_table(n, seed=seed + i), folder / f"part-{i}.parquet")


def test_extraction_resumes_by_part_and_a_new_file_extracts_only_itself(
    ray_local, labeled_parquet, tiny_encoder_dir, tmp_path
):
    splits = load_labeled_splits(DataConfig(train_path=labeled_parquet))
    init = stage1_checkpoint(splits, tiny_encoder_dir, tmp_path)
    corpus = tmp_path / "corpus"
    write_corpus(corpus, [50, 70])
    config = store_config(
        tmp_path, unlabeled_path=str(corpus), unlabeled_text_column="body", max_unlabeled_rows=None
    )
    stores, rows, _ = cached_features(splits, init, config)
    store = stores["train"]
    assert rows == splits.train.num_rows + 120 and len(store.parts) == 3
    written = part_times(store)
    killed = store.parts[2]  # as if the run had died before this part was committed
    before = teacher_rows(store, killed)
    (store.path / killed.name).unlink()
    again, _, _ = cached_features(splits, init, config)
    redone = part_times(again["train"])
    assert [n for n in redone if redone[n] != written[n]] == [killed.name]  # only the missing part
    assert np.allclose(teacher_rows(again["train"], killed), before)
    pq.write_table(unlabeled_table(30, seed=9), corpus / "part-2.parquet")  # a new file in the corpus
    grown, rows, _ = cached_features(splits, init, config)
    assert rows == splits.train.num_rows + 150 and read_features(grown["train"]).count() == rows
    added = part_times(grown["train"])
    assert [n for n in added if added.get(n) != redone.get(n)] == [grown["train"].parts[3].name]


def teacher_rows(store, part):
    """The part's teacher logits, rows sorted (parts are sets of rows; their order is the stream's)."""
    table = read_features(FeatureStore(store.path, (part,))).to_pandas()
    logits = np.stack(table["teacher_logits"].to_list())
    return logits[np.lexsort(logits.T)]


def test_a_capped_corpus_takes_its_first_rows_in_file_order_and_unreadable_texts_are_counted(
    ray_local, labeled_parquet, tiny_encoder_dir, tmp_path
):
    splits = load_labeled_splits(DataConfig(train_path=labeled_parquet))
    init = stage1_checkpoint(splits, tiny_encoder_dir, tmp_path)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    pq.write_table(pa.table({"body": ["good film", None, "", "  ", "awful"] * 6}), corpus / "a.parquet")
    write_corpus(corpus, [40, 40], seed=5)  # part-0, part-1 (after a.parquet in file order)
    config = store_config(
        tmp_path, unlabeled_path=str(corpus), unlabeled_text_column="body", max_unlabeled_rows=50
    )
    stores, rows, _ = cached_features(splits, init, config)
    store = stores["train"]
    assert [p.rows for p in store.parts[1:]] == [30, 20]  # a.parquet whole, 20 rows of part-0, none of part-1
    assert rows == splits.train.num_rows + 50
    unlabeled = read_features(store).filter(lambda row: row["label_id"] == -100).count()
    assert unlabeled == 12 + 20  # a.parquet's 18 null / empty / blank texts are counted, not written


def test_joint_training_trains_every_exit(ray_local, labeled_parquet, tiny_encoder_dir, tmp_path):
    splits = load_labeled_splits(DataConfig(train_path=labeled_parquet))
    tracking = mlflow_run(tmp_path)
    fit_stage(
        "joint",
        splits,
        tiny_encoder_dir("bert", num_layers=3),
        tmp_path,
        tracking=tracking,
        epochs=5,
        joint_weighting="layer_index",
    )
    for layer in (1, 3):
        assert max(v for _, v in metric_history(*tracking, f"joint_dev_accuracy_layer_{layer}")) > 0.6


def test_train_step_on_plain_batches_lowers_the_loss(tiny_model):
    model = tiny_model("bert", num_layers=2).train()
    texts = [f"{t} good great" if i % 2 else f"{t} bad awful" for i, t in enumerate(random_texts(64, seed=1))]
    labels = [i % 2 for i in range(64)]
    batches = [{"text": texts[i : i + 16], "label_id": labels[i : i + 16]} for i in range(0, 64, 16)]
    config = JointConfig(learning_rate=1e-2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    loss_fn = STAGES["joint"].loss(config)
    first = [
        train_step(model, b, STAGES["joint"], loss_fn, optimizer, scheduler, torch.device("cpu"))
        for b in batches
    ]
    for _ in range(5):
        last = [
            train_step(model, b, STAGES["joint"], loss_fn, optimizer, scheduler, torch.device("cpu"))
            for b in batches
        ]
    assert sum(last) < 0.5 * sum(first)
    recorded = exit_logits(model, batches, torch.device("cpu"))
    logits, gold = recorded.logits, recorded.labels
    assert recorded.tokens.tolist() == model.tokenize(texts).lengths.tolist()
    assert logits.shape == (2, 64, 3) and min(per_layer_accuracy(logits, gold)) > 0.9


def test_stage1_refuses_unlabeled_rows(tiny_model):
    model: EarlyExitClassifier = tiny_model("bert")
    batch = {"text": ["a", "b"], "label_id": [0, -100]}
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="stage1 needs a gold label on every row"):
        train_step(
            model,
            batch,
            STAGES["stage1"],
            STAGES["stage1"].loss(Stage1Config()),
            optimizer,
            None,
            torch.device("cpu"),
        )
