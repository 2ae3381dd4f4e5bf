"""The typed preprocessing contract: scaling strategies and ``Preprocess`` checked once, chosen by ``_target_``,
stored in the same dict form as before, and a prepared folder refused when its stored preprocessing differs."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from modality.intensity import (
    DtypeScaling,
    MinMaxScaling,
    PercentileScaling,
    Preprocess,
    Scaling,
    WindowScaling,
    slice_to_uint8,
)
from modality.paths import CONFIG_DIR
from modality.prepare import check_stored_preprocess, preprocess_from_cfg
from modality.records import DecodedSlice

#: What prepare stored in summary.json["preprocess"]["scaling"] (and each sample's ``scaling``) for each
#: configs/scaling option before the strategies were typed: the stored form must not change.
STORED_BEFORE = {
    "percentile": {"method": "percentile", "low": 0.5, "high": 99.5},
    "minmax": {"method": "minmax"},
    "dtype": {"method": "dtype"},
    "window": {"method": "window", "windows": {"CT": [40, 400]}, "low": 0.5, "high": 99.5},
}
EXPECTED_CLASS = {
    "percentile": PercentileScaling,
    "minmax": MinMaxScaling,
    "dtype": DtypeScaling,
    "window": WindowScaling,
}


def _compose_prepare(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("prepare", overrides=list(overrides))


@pytest.mark.parametrize("name", sorted(STORED_BEFORE))
def test_each_scaling_config_builds_its_strategy_with_the_stored_form_unchanged(name: str) -> None:
    preprocess = preprocess_from_cfg(_compose_prepare(f"scaling={name}"))
    assert type(preprocess.scaling) is EXPECTED_CLASS[name]
    stored = preprocess.scaling.to_dict()
    # Same keys in the same order (summary.json is written unsorted) and the same JSON text.
    assert json.dumps(stored) == json.dumps(STORED_BEFORE[name])
    assert Scaling.from_dict(STORED_BEFORE[name]) == preprocess.scaling


def test_default_prepare_config_is_the_code_default() -> None:
    preprocess = preprocess_from_cfg(_compose_prepare())
    assert preprocess == Preprocess()
    assert json.dumps(preprocess.to_dict()) == json.dumps(
        {"image_size": 224, "aspect": "pad", "scaling": STORED_BEFORE["percentile"], "colour": "grey"}
    )


def test_stored_forms_read_back() -> None:
    # A stored form without "method" or parameters reads as the defaults, as the string dispatcher read it.
    assert Scaling.from_dict({}) == PercentileScaling()
    assert Scaling.from_dict({"method": "percentile"}) == PercentileScaling(0.5, 99.5)
    assert Scaling.from_dict({"method": "percentile", "low": 1, "high": 99}) == PercentileScaling(1.0, 99.0)
    # The config form (a _target_ naming one of the strategies) is read too.
    assert Scaling.from_dict({"_target_": "modality.intensity.scaling.MinMaxScaling"}) == MinMaxScaling()
    # A summary.json preprocess block: keys owned by others (class_map...) are left alone.
    block = {"image_size": 32, "aspect": "crop", "scaling": {"method": "dtype"}, "colour": "reject"}
    assert Preprocess.from_dict({**block, "class_map": {"classes": ["CT"]}}) == Preprocess(
        image_size=32, aspect="crop", scaling=DtypeScaling(), colour="reject"
    )
    assert Preprocess.from_dict({}) == Preprocess()
    # Window order and the spelling of an entry do not matter; the stored form is [center, width].
    a = WindowScaling(windows={"CT": [40, 400], "XR": {"center": 50, "width": 100}})
    b = Scaling.from_dict({"method": "window", "windows": {"xr": [50, 100], "CT": [40.0, 400.0]}})
    assert a == b
    assert a.to_dict()["windows"] == {"CT": [40, 400], "XR": [50, 100]}
    # Objects cross to pool workers by pickle.
    assert pickle.loads(pickle.dumps(Preprocess(scaling=a))) == Preprocess(scaling=a)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: PercentileScaling(low=99.9, high=99.5), "0 <= low < high <= 100"),
        (lambda: PercentileScaling(low=-1), "0 <= low < high <= 100"),
        (lambda: PercentileScaling(low="1"), "low must be a number"),
        (lambda: PercentileScaling(high=True), "high must be a number"),
        (lambda: WindowScaling(windows={"CT": [40, 0]}), "width must be positive"),
        (lambda: WindowScaling(windows={"CT": [40]}), r"\[center, width\]"),
        (lambda: WindowScaling(windows={"CT": {"centre": 40, "width": 400}}), r"\[center, width\]"),
        (lambda: WindowScaling(windows={"CT": [40, 400], "ct": [0, 100]}), "given twice"),
        (lambda: Scaling.from_dict({"method": "zscore"}), "unknown scaling method 'zscore'"),
        (lambda: Scaling.from_dict({"method": "minmax", "low": 1}), "minmax scaling takes"),
        (lambda: Scaling.from_dict({"_target_": "os.system"}), "unknown scaling _target_"),
        (lambda: Preprocess(image_size=0), "image_size"),
        (lambda: Preprocess(aspect="squash"), "aspect"),
        (lambda: Preprocess(colour="rgb"), "colour"),
        (lambda: Preprocess(scaling="percentile"), "scaling must be"),
    ],
)
def test_invalid_settings_are_refused_when_built(build, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def test_invalid_config_is_refused_by_prepare_before_any_work() -> None:
    with pytest.raises(Exception, match="0 <= low < high <= 100"):
        preprocess_from_cfg(_compose_prepare("scaling.low=99.9"))


def test_stored_dict_and_typed_object_give_the_same_pixels() -> None:
    # raw-file prediction passes the checkpoint's data_info["preprocess"], a stored dict
    pixels = np.tile(np.linspace(-1000.0, 1000.0, 300, dtype=np.float32), (150, 1))
    decoded = DecodedSlice(pixels=pixels, index=0, value_range=(-1024.0, 3071.0), meta={})
    for name in STORED_BEFORE:
        stored = {"image_size": 48, "aspect": "pad", "scaling": STORED_BEFORE[name], "colour": "grey"}
        typed = Preprocess.from_dict(stored)
        np.testing.assert_array_equal(
            slice_to_uint8(decoded, "CT", stored), slice_to_uint8(decoded, "CT", typed)
        )


def _summary(tmp_path: Path, scaling: dict) -> Path:
    block = {"image_size": 224, "aspect": "pad", "scaling": scaling, "colour": "grey", "class_map": {}}
    (tmp_path / "summary.json").write_text(json.dumps({"preprocess": block}), encoding="utf-8")
    return tmp_path


def test_prepared_folder_is_reused_only_for_the_same_preprocessing(tmp_path: Path) -> None:
    out_dir = _summary(tmp_path, STORED_BEFORE["window"])
    same = Preprocess(scaling=WindowScaling(windows={"ct": (40.0, 400.0)}, low=0.5, high=99.5))
    check_stored_preprocess(out_dir, same)  # no error: equal values, whatever their spelling
    with pytest.raises(
        ValueError, match=r"another preprocessing \(scaling: stored .*'window'.*requested.*'minmax'"
    ):
        check_stored_preprocess(out_dir, Preprocess(scaling=MinMaxScaling()))
    with pytest.raises(ValueError, match=r"another preprocessing \(image_size: stored 224, requested 64\)"):
        check_stored_preprocess(out_dir, Preprocess(image_size=64, scaling=same.scaling))
    unreadable = _summary(tmp_path, {"method": "zscore"})
    with pytest.raises(ValueError, match=r"cannot read.*zscore.*delete this one"):
        check_stored_preprocess(unreadable, Preprocess())
