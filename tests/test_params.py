"""Every parameter of every notebook is checked: the spec matches the parameters cell,
the defaults pass, and one bad value per parameter is refused with a message naming it."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from winclip_nb.core.errors import ConfigError
from winclip_nb.data import load_mvtec_class
from winclip_nb.nb.params import PARAMETERS, check_parameters, known_names, pick_sample

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"

#: One bad value for every parameter name any notebook has, and what the message must say.
BAD = {
    "data_root": ("/no/such/folder", "an existing folder or None"),
    "class_name": ("", "a non-empty string"),
    "weights": ("missing/model.safetensors", "an existing checkpoint file"),
    "tokens_weights": ("nope.pt", "an existing checkpoint file"),
    "device": ("gpu", "'auto', 'cpu', 'cuda' or 'cuda:N'"),
    "llava_device": ("tpu", "'auto', 'cpu', 'cuda' or 'cuda:N'"),
    "seed": (-1, "an integer >= 0"),
    "n_train": (0, "an integer >= 1"),
    "n_good": (2.0, "an integer >= 1"),
    "n_per_defect": ("1", "an integer >= 1"),
    "n_test": (True, "an integer >= 1"),
    "top_k": (0, "an integer >= 1"),
    "top_n": (-3, "an integer >= 1"),
    "max_images": (0, "an integer >= 1"),
    "small_max_images": (0.5, "an integer >= 1"),
    "speed_repeats": (0, "an integer >= 1"),
    "save_examples": (-1, "an integer >= 0"),
    "image_size": (16, "an integer >= 32"),
    "defect": (3, "a non-empty string"),
    "llava_model": ("  ", "a non-empty string"),
    "out_dir": (5, "a folder path or None"),
    "layers": ("[9, 10]", "a list of distinct integers >= 0 (lists go with -y"),
    "window_scales": ([2, 2], "a list of distinct integers >= 1"),
    "query_patch": ((3,), "None or (row, col), two integers >= 0"),
    "defect_coverage": (0, "a number in (0, 1]"),
    "coreset_ratio": (1.5, "a number in (0, 1]"),
    "ratios": ([0.1, 2], "a list of numbers in [1e-09, 1]"),
    "text_weight": (-0.1, "a number >= 0"),
    "nn_weight": ("high", "a number >= 0"),
    "sigma": (float("nan"), "a number >= 0"),
    "threshold": ("3", "a number"),
    "normalization": ("minmax", "one of"),
    "fg_threshold": (1.5, "a number in [0, 1]"),
    "interactive": ("yes", "True or False or None"),
    "classes": ("disc", "a list of names or None"),
    "small_classes": (None, "a list of names"),
    "k_shot": (-1, "an integer >= 0"),
    "force": ("no", "True or False"),
    "solutions": ("yes", "True or False"),
}


def parameters_cell(name: str) -> dict:
    """The parameters cell of notebook ``name``, executed: its names and default values."""
    nb = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)
    (cell,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    values: dict = {}
    exec(cell.source, {}, values)  # noqa: S102 - our own notebook's literal assignments
    return values


@pytest.mark.parametrize("notebook", sorted(PARAMETERS))
def test_spec_names_the_parameters_cell_and_the_defaults_pass(notebook: str) -> None:
    defaults = parameters_cell(notebook)
    assert set(PARAMETERS[notebook]) == set(defaults), notebook
    check_parameters(notebook, defaults)


def test_every_notebook_has_a_spec_and_calls_it() -> None:
    names = sorted(p.stem for p in NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
    assert names == sorted(PARAMETERS)
    for name in names:
        nb = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)
        index = next(
            i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])
        )
        assert f'check_parameters("{name}", globals())' in nb.cells[index + 1].source, name


@pytest.mark.parametrize(
    ("notebook", "parameter"),
    [(nb, p) for nb in sorted(PARAMETERS) for p in sorted(PARAMETERS[nb])],
)
def test_a_bad_value_is_refused_naming_the_parameter(notebook: str, parameter: str) -> None:
    value, accepted = BAD[parameter]
    values = {**parameters_cell(notebook), parameter: value}
    with pytest.raises(ConfigError) as info:
        check_parameters(notebook, values)
    message = str(info.value)
    assert message.startswith(f"bad parameters for notebook {notebook}: {parameter}={value!r}")
    assert accepted in message, message
    assert message.count("must be") == 1  # only the bad one


def test_all_problems_are_listed_at_once_and_missing_names_too() -> None:
    values = {**parameters_cell("04_fusion_foreground_mad"), "sigma": -1, "n_train": 0}
    del values["seed"]
    message = str(
        pytest.raises(ConfigError, check_parameters, "04_fusion_foreground_mad", values).value
    )
    assert "sigma=-1 must be" in message and "n_train=0 must be" in message
    assert "seed is missing" in message
    with pytest.raises(ConfigError, match="no parameter checks for notebook '99_x'; known: 00_"):
        check_parameters("99_x", {})


def test_existing_paths_pass(tmp_path: Path) -> None:
    checkpoint = tmp_path / "clip.safetensors"
    checkpoint.write_bytes(b"")
    values = {
        **parameters_cell("00_quickstart"),
        "data_root": str(tmp_path),
        "weights": str(checkpoint),
    }
    check_parameters("00_quickstart", values)
    values["out_dir"] = str(tmp_path / "not" / "yet")  # an output folder may be new
    check_parameters("00_quickstart", values)


def test_default_defect_falls_back_and_any_other_is_an_error(synthetic_root) -> None:
    data = load_mvtec_class(synthetic_root, "weave")
    notes: list[str] = []  # a default that another dataset lacks (MVTec-AD's "dent", say)
    assert pick_sample(data, "dent", default="dent", log=notes.append) is data.test[-1]
    assert notes and "'dent' is not in class 'weave'" in notes[0]
    with pytest.raises(
        ConfigError, match=r"defect='holes' is not a defect type of class 'weave'; available: "
    ):
        pick_sample(data, "holes", default="hole")
    found = pick_sample(data, data.defect_types[0], default="hole")
    assert found.defect == data.defect_types[0]


def test_known_names() -> None:
    assert known_names("classes", ["a"], ["a", "b"]) == ["a"]
    with pytest.raises(
        ConfigError, match=r"classes=\['a', 'zz'\]: 'zz' not in this dataset; available: a, b"
    ):
        known_names("classes", ["a", "zz"], ["a", "b"])
