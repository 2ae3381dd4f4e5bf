"""The value-statistics head: fitted from prepared shards, deterministic, saved in checkpoints, fused at prediction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from prepare_helpers import write_dicom
from test_prepare import pool, pool_items, settings  # noqa: F401 - pool is a fixture

from modality.data import ModalityDataModule
from modality.evaluation.predict import predict_files
from modality.intensity.value_stats import VALUE_FEATURES, value_features
from modality.models import ModalityClassifier
from modality.models.value_head import DEFAULT_CNN_WEIGHT, ValueStatsHead, fuse_probabilities
from modality.shards.build import build_shards

CLASSES = ["CT", "MR", "PT", "XR"]


def synthetic_features(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """CT-like (air at -1000) and MR-like (non-negative integers) slices, labels 0 and 1."""
    rng = np.random.default_rng(seed)
    rows, labels = [], []
    for i in range(n):
        if i % 2 == 0:
            image = np.where(rng.random((32, 32)) < 0.4, -1000.0, rng.normal(40, 30, (32, 32)))
        else:
            image = np.round(rng.gamma(2.0, 200.0, (32, 32)))
        rows.append(value_features(image))
        labels.append(i % 2)
    return np.asarray(rows, dtype=np.float32), np.asarray(labels)


def test_head_fits_separable_units_deterministically_and_is_not_trainable() -> None:
    x, y = synthetic_features(40, 0)
    heads = [ValueStatsHead(len(VALUE_FEATURES), 4) for _ in range(2)]
    torch.manual_seed(123)  # the global RNG must not matter
    heads[0].fit(x, y, seed=0)
    torch.manual_seed(456)
    heads[1].fit(x, y, seed=0)
    for a, b in zip(heads[0].state_dict().values(), heads[1].state_dict().values(), strict=True):
        assert torch.equal(a, b)
    test_x, test_y = synthetic_features(20, 1)
    predicted = heads[0](torch.as_tensor(test_x)).argmax(1).numpy()
    assert (predicted == test_y).all()
    assert heads[0].is_fitted and not any(p.requires_grad for p in heads[0].parameters())
    with pytest.raises(ValueError, match="features"):
        heads[0].fit(x[:, :3], y)


def test_product_of_experts_fusion() -> None:
    cnn = np.array([[0.6, 0.4], [0.5, 0.5]])
    values = np.array([[0.2, 0.8], [0.9, 0.1]])
    fused = fuse_probabilities(cnn, values)
    np.testing.assert_allclose(fused[0], np.array([0.12, 0.32]) / 0.44)
    np.testing.assert_allclose(fused[1], [0.9, 0.1])
    np.testing.assert_allclose(fused.sum(axis=1), 1.0)


def test_head_fitted_from_shards_travels_in_the_checkpoint_and_drives_raw_prediction(
    pool,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
) -> None:
    root, split = pool
    build_shards(pool_items(root, split), settings(tmp_path / "prepared", split))
    module = ModalityDataModule(str(tmp_path / "prepared"), prepare_dataset=None, image_size=32)
    module.setup("fit")
    features, labels = module.train_value_features()
    assert features.shape == (
        module.train_class_counts()[0] + module.train_class_counts()[1],
        len(VALUE_FEATURES),
    )
    assert sorted(set(labels.tolist())) == [0, 1]  # the pool's CT and MR

    model = ModalityClassifier("resnet18", data_info=module.data_info(), value_head=True)
    model.value_head.fit(features, labels)
    path = tmp_path / "model.ckpt"
    import pytorch_lightning as pl

    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": dict(model.hparams),
            "pytorch-lightning_version": pl.__version__,
        },
        path,
    )
    restored = ModalityClassifier.load_from_checkpoint(path, weights_only=True)
    assert restored.value_head.is_fitted
    for key, value in model.value_head.state_dict().items():
        assert torch.equal(value, restored.value_head.state_dict()[key]), key

    raw = tmp_path / "raw"
    write_dicom(raw / "ct.dcm", modality="CT", patient_id="X1", seed=7)
    write_dicom(raw / "mr.dcm", modality="MR", patient_id="X2", seed=8)
    rows = {}
    for fusion in ("cnn", "values", "product"):
        predict_files(restored, restored.hparams.data_info, raw, tmp_path / fusion, fusion=fusion)
        rows[fusion] = (tmp_path / fusion / "predictions.csv").read_text().splitlines()
    header = rows["values"][0].split(",")
    by_path = {r.split(",")[0]: dict(zip(header, r.split(","), strict=True)) for r in rows["values"][1:]}
    assert by_path[str(raw / "ct.dcm")]["predicted"] == "CT"  # units alone tell the pool's CT from its MR
    assert by_path[str(raw / "mr.dcm")]["predicted"] == "MR"
    assert "cnn_predicted" in header
    with pytest.raises(ValueError, match="fusion"):
        predict_files(restored, restored.hparams.data_info, raw, tmp_path / "x", fusion="mean")


def test_shards_without_value_features_are_refused_by_name(tmp_path: Path) -> None:
    from tiny_shards import write_tiny_shards

    write_tiny_shards(tmp_path, {"train": [4], "val": [4]})
    module = ModalityDataModule(str(tmp_path), prepare_dataset=None, shuffle_buffer=4)
    module.setup("fit")
    with pytest.raises(ValueError, match="value_features"):
        module.train_value_features()


def test_shard_evaluation_fuses_the_recorded_value_features(pool, tmp_path: Path) -> None:  # noqa: F811
    from modality.evaluation.shard_split import predict_split
    from modality.shards.listing import plan_split, read_summary

    root, split = pool
    build_shards(pool_items(root, split), settings(tmp_path / "prepared", split))
    module = ModalityDataModule(str(tmp_path / "prepared"), prepare_dataset=None, image_size=32)
    module.setup("fit")
    model = ModalityClassifier("resnet18", data_info=module.data_info(), value_head=True).eval()
    model.value_head.fit(*module.train_value_features())
    urls = plan_split(
        read_summary(tmp_path / "prepared/summary.json"), "val", tmp_path / "prepared/shards"
    ).urls
    info = module.data_info()
    fused = predict_split(model, info, urls, 8)
    alone = predict_split(model, info, urls, 8, fusion="cnn")
    values = predict_split(model, info, urls, 8, fusion="values")
    assert fused.keys == alone.keys and len(fused) > 0
    np.testing.assert_allclose(fused.cnn_probs, alone.probs, atol=1e-6)  # the CNN part is the same
    np.testing.assert_allclose(
        fused.probs,
        fuse_probabilities(np.asarray(alone.probs), np.asarray(values.probs), DEFAULT_CNN_WEIGHT),
        atol=1e-5,
    )
    assert np.argmax(values.probs, axis=1).tolist() == fused.targets  # units alone tell the val site's CT/MR

    # As simulated 8-bit exports: every DICOM slice is exported, its pixels change, the value head abstains.
    exported = predict_split(model, info, urls, 8, simulate_exports=True)
    assert exported.keys == fused.keys and all(exported.exported) and not any(fused.exported)
    assert all(v is None for v in exported.value_probs) and all(v is not None for v in fused.value_probs)
    np.testing.assert_allclose(exported.probs, exported.cnn_probs)
    assert not np.allclose(exported.cnn_probs, fused.cnn_probs, atol=1e-4)
    again = predict_split(model, info, urls, 8, simulate_exports=True)
    np.testing.assert_allclose(again.cnn_probs, exported.cnn_probs)  # seeded by each sample's key


def test_fit_start_fits_the_head_from_the_datamodule(pool, tmp_path: Path) -> None:  # noqa: F811
    import pytorch_lightning as pl

    root, split = pool
    build_shards(pool_items(root, split), settings(tmp_path / "prepared", split))
    module = ModalityDataModule(
        str(tmp_path / "prepared"), prepare_dataset=None, image_size=32, batch_size=4, num_workers=0
    )
    module.setup("fit")
    model = ModalityClassifier(
        "resnet18", data_info=module.data_info(), value_head=True, float_value_head=True
    )
    assert not model.value_head.is_fitted and not model.value_head_float.is_fitted
    trainer = pl.Trainer(
        fast_dev_run=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(model, datamodule=module)
    assert model.value_head.is_fitted and model.value_head_float.is_fitted
    features, labels = module.train_value_features()
    assert (model.value_probabilities(features).argmax(1) == labels).mean() > 0.9  # CT vs MR by their units


def test_adding_the_head_leaves_the_random_stream_alone() -> None:
    info = {"classes": CLASSES, "input_size": 32}
    torch.manual_seed(7)
    ModalityClassifier("resnet18", data_info=info)
    plain = torch.rand(3)
    torch.manual_seed(7)
    ModalityClassifier("resnet18", data_info=info, value_head=True)
    assert torch.equal(torch.rand(3), plain)  # the CNN trains on the same random numbers with or without it


def test_calibration_fitted_on_unseen_splits_is_found_beside_the_checkpoint(pool, tmp_path: Path) -> None:  # noqa: F811
    import pytorch_lightning as pl

    from modality.evaluation.checkpoint import CheckpointSource, find_calibration
    from modality.evaluation.shard_split import calibrate_on_splits

    root, split = pool
    prepared = tmp_path / "prepared"
    build_shards(pool_items(root, split), settings(prepared, split))
    module = ModalityDataModule(str(prepared), prepare_dataset=None, image_size=32)
    module.setup("fit")
    model = ModalityClassifier("resnet18", data_info=module.data_info(), value_head=True)
    model.value_head.fit(*module.train_value_features())
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    ckpt = run / "checkpoints" / "last.ckpt"
    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": dict(model.hparams),
            "pytorch-lightning_version": pl.__version__,
        },
        ckpt,
    )
    fitted = calibrate_on_splits(ckpt, prepared, ["val"], run / "calibration.json")
    assert fitted is not None and fitted.fitted_on["splits"] == ["val"]
    assert fitted.fitted_on["samples"] > 0
    found, path = find_calibration(None, CheckpointSource(ckpt, run))
    assert path == run / "calibration.json" and found == fitted
    assert find_calibration("none", CheckpointSource(ckpt, run)) == (None, None)
    with pytest.raises(FileNotFoundError):
        find_calibration(str(tmp_path / "missing.json"), CheckpointSource(ckpt, run))


def test_the_head_learns_only_from_samples_with_physical_units(tmp_path: Path) -> None:
    """8-bit image files (no units) never reach the head: it must not learn "8-bit means X-ray"."""
    from PIL import Image

    from modality.records import InputItem
    from modality.shards.build import build_shards as build

    root = tmp_path / "raw"
    write_dicom(root / "ct1.dcm", modality="CT", patient_id="A1", seed=1)
    write_dicom(root / "mr1.dcm", modality="MR", patient_id="A2", seed=2)
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (48, 48), dtype=np.uint8)).save(
        root / "xr1.png"
    )
    items = [
        InputItem(path=str(root / "ct1.dcm"), dataset="site_a", kind="dicom"),
        InputItem(path=str(root / "mr1.dcm"), dataset="site_a", kind="dicom"),
        InputItem(path=str(root / "xr1.png"), dataset="site_a", kind="image", label="XR", patient_id="A3"),
    ]
    build(items, settings(tmp_path / "prepared", {"site_a": "train"}))
    module = ModalityDataModule(str(tmp_path / "prepared"), prepare_dataset=None, image_size=32)
    module.setup("fit")
    features, labels = module.train_value_features()
    assert len(features) == len(labels) == 2
    classes = module.data_info()["classes"]
    assert sorted(classes[i] for i in labels) == ["CT", "MR"]
    assert sum(module.train_class_counts()) == 3
    assert module.train_value_sources() == ["site_a", "site_a"]  # one per row, for sources_alike
    # ... but the 8-bit radiograph is offered to it separately, to be learnt from as a DICOM radiograph
    exports = module.train_exported_radiographs(classes.index("XR"))
    assert exports.shape == (1, len(VALUE_FEATURES))
    assert exports[0, VALUE_FEATURES.index("log2_rows")] == pytest.approx(np.log2(48))
    assert module.train_exported_radiographs(classes.index("CT")).shape[0] == 0  # CT has units: not here
    # the shards are read once for both questions, and the scripts' pool reader sees the same rows
    reads = []
    original = module._train_meta_samples
    module._value_rows_cache = None
    module._train_meta_samples = lambda: reads.append(1) or original()
    module.train_value_features(), module.train_exported_radiographs(classes.index("XR"))
    module.train_value_sources()
    assert len(reads) == 1
    from modality.data.value_rows import prepared_value_rows

    rows = sorted(prepared_value_rows(tmp_path / "prepared"), key=lambda row: row.label)
    assert [(row.label, row.units) for row in rows] == [("CT", True), ("MR", True), ("XR", False)]
    assert [row.exported_radiograph for row in rows] == [False, False, True]
    np.testing.assert_array_equal(
        np.asarray([row.features for row in rows[:2]], np.float32), features[np.argsort(labels)]
    )
    assert rows[2].dataset == "site_a"
    np.testing.assert_array_equal(np.asarray(rows[2].features, np.float32), exports[0])


def test_slices_stored_as_floats_are_answered_by_the_float_head() -> None:
    """A slice with no stored integers (peak statistics 0) goes to the head that never read the stored peak;
    integer slices to the main head. Without the float head every slice goes to the main head, and a model
    saved without it keeps the hyperparameters it always had (older checkpoints load as before)."""
    from modality.intensity.value_stats import FLOAT_FEATURES, stored_as_float

    info = {"classes": CLASSES, "input_size": 32}
    model = ModalityClassifier("resnet18", data_info=info, value_head=True, float_value_head=True)
    assert model.hparams["float_value_head"] is True
    assert "float_value_head" not in ModalityClassifier("resnet18", data_info=info, value_head=True).hparams
    # integer storage: PET at the int16 peak (class 2); as floats the same statistics say MR (class 1)
    rows = [
        value_features(np.round(np.random.default_rng(i).gamma(2.0, 200.0, (16, 16))), 32767)
        for i in range(8)
    ]
    x = np.asarray(rows, dtype=np.float32)
    floats = x.copy()
    floats[:, len(FLOAT_FEATURES) :] = 0.0
    assert not stored_as_float(x).any() and stored_as_float(floats).all()
    model.value_head.fit(np.concatenate([x, floats]), np.array([2] * 8 + [0] * 8), seed=0)
    model.value_head_float.fit(x[:, : len(FLOAT_FEATURES)], np.array([1] * 8), seed=0)
    mixed = np.concatenate([x[:4], floats[:4]])
    answers = model.value_probabilities(mixed).argmax(1)
    assert answers.tolist() == [2] * 4 + [1] * 4  # main head for integers, float head for floats
    from modality.models.value_head import float_head_rows

    rows = [x[0].tolist(), None, floats[0].tolist()]  # None: an input the value head abstains on
    assert float_head_rows(model, rows).tolist() == [False, False, True]  # what the fusion reads
    model.value_head_float = None
    assert not float_head_rows(model, rows).any()
    assert model.value_probabilities(mixed).argmax(1).tolist() == [2] * 4 + [0] * 4  # main head for all


def test_the_float_head_reads_neither_the_stored_peak_nor_whether_values_are_integers() -> None:
    """Stored as floats, an MR volume scaled on export reads as non-integer; the float head must see the
    same inputs for it as for the same slice at integer values (up to the scale, which the unit copies cover)."""
    from modality.intensity.value_stats import FLOAT_FEATURES, float_head_inputs

    image = np.round(np.random.default_rng(0).gamma(2.0, 200.0, (32, 32)))
    integers = np.asarray([value_features(image, 1200)], dtype=np.float32)
    scaled = np.asarray([value_features(image * 0.7316)], dtype=np.float32)  # float storage: no peak
    column = VALUE_FEATURES.index("fraction_non_integer")
    assert integers[0, column] == 0.0 and scaled[0, column] > 0.9  # what the main head would read
    a, b = float_head_inputs(integers), float_head_inputs(scaled)
    assert a.shape == (1, len(FLOAT_FEATURES)) and a[0, column] == b[0, column] == 0.0
    same = [i for i, name in enumerate(FLOAT_FEATURES) if name.startswith("log2_")]
    np.testing.assert_allclose(a[0, same], b[0, same])  # the matrix size does not move


def test_eight_bit_radiographs_teach_the_head_dicom_radiographs() -> None:
    """A head that has seen DICOM CT and MR but radiographs only as 8-bit exports calls a DICOM radiograph
    X-ray once the exports are learnt from as detector integers (fit_on_training_samples' radiographs), and
    never without them."""
    from modality.models.value_head import fit_on_training_samples

    rng = np.random.default_rng(4)
    x, y = synthetic_features(40, 0)  # CT 0, MR 1 (32 x 32 slices)
    exports = np.array(
        [value_features(np.clip(rng.normal(130, 50, (1536, 1536)), 0, 255).round(), 255) for _ in range(8)],
        dtype=np.float32,
    )
    detector = value_features(np.clip(rng.normal(2000, 700, (2048, 1664)), 0, 4095).round(), 4095)
    with_exports, without = ValueStatsHead(len(VALUE_FEATURES), 4), ValueStatsHead(len(VALUE_FEATURES), 4)
    fit_on_training_samples(with_exports, x, y, [1], exports, 3)
    fit_on_training_samples(without, x, y, [1])
    row = torch.as_tensor(np.array([detector], dtype=np.float32))
    assert with_exports(row).argmax(1).item() == 3
    assert without(row).argmax(1).item() != 3
    assert (with_exports(torch.as_tensor(x)).argmax(1).numpy() == y).all()  # CT and MR still right


def test_sources_alike_weighs_each_source_of_a_class_as_its_largest() -> None:
    from modality.models.value_head import sources_alike

    labels = np.array([0, 0, 0, 0, 1, 1, 1])
    sources = ["a", "a", "a", "b", "c", "d", "d"]
    assert sources_alike(labels, sources).tolist() == [1, 1, 1, 3, 2, 1, 1]
    with pytest.raises(ValueError):
        sources_alike(labels, sources[:-1])  # one source per row


def test_a_small_source_keeps_its_share_of_its_class() -> None:
    """Where a small MR source looks exactly like CT, the pooled fit lets the big MR source outvote it
    (MR's weight is spread over 402 rows); weighing sources alike gives it its class's largest source's
    weight, so the head answers MR there with about the share the sources imply (1/3), not about 0."""
    from modality.models.value_head import fit_on_training_samples

    rng = np.random.default_rng(5)
    ct_like = value_features(np.where(rng.random((32, 32)) < 0.4, -1000.0, rng.normal(40, 30, (32, 32))))
    mr_like = value_features(np.round(rng.gamma(2.0, 200.0, (32, 32))))
    x = np.asarray([ct_like] * 20 + [mr_like] * 400 + [ct_like] * 2, dtype=np.float32)
    y = np.array([0] * 20 + [1] * 402)
    sources = ["ct"] * 20 + ["mr big"] * 400 + ["mr small"] * 2
    pooled, alike = ValueStatsHead(len(VALUE_FEATURES), 2), ValueStatsHead(len(VALUE_FEATURES), 2)
    fit_on_training_samples(pooled, x, y)
    fit_on_training_samples(alike, x, y, sources=sources)
    point = torch.as_tensor(np.asarray([ct_like], dtype=np.float32))
    with torch.inference_mode():
        assert torch.softmax(pooled(point), 1)[0, 1].item() < 0.05
        assert 0.2 < torch.softmax(alike(point), 1)[0, 1].item() < 0.45
        mr = torch.as_tensor(np.asarray([mr_like], dtype=np.float32))
        assert alike(mr).argmax(1).item() == 1  # the big source is still MR


def test_fit_takes_class_or_sample_weights_not_both() -> None:
    x, y = synthetic_features(8, 0)
    head = ValueStatsHead(len(VALUE_FEATURES), 2)
    with pytest.raises(ValueError, match="not both"):
        head.fit(x, y, [1.0, 1.0], sample_weights=np.ones(len(y)))
    with pytest.raises(ValueError, match="sample weights"):
        head.fit(x, y, sample_weights=np.ones(len(y) - 1))
    with pytest.raises(ValueError, match="sample weights"):
        head.fit(x, y, sample_weights=-np.ones(len(y)))
    with pytest.raises(ValueError, match="not all 0"):
        head.fit(x, y, sample_weights=np.zeros(len(y)))  # a weighted mean over nothing
