"""Property-based tests of the code that meets user values in memory: the image processor (any shape, dtype, channel
count, value range, NaN/inf, PIL mode, 16 bit, tiny and odd sizes), mask binarisation, the description parsers,
``--set`` overrides and config building. See ``properties.py`` for the rule every generated input must obey."""

from __future__ import annotations

import re

import numpy as np
import torch
import yaml
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image
from properties import budget, outcome

from modeling_stpnet import STPNetImageProcessor
from modeling_stpnet.image_processing_stpnet import IMAGENET_MEAN, IMAGENET_STD, mask_to_bool
from stpnet.data.io import DataError
from stpnet.data.lung_text import categories_from_zones, parse_lung_description
from stpnet.training.config import ConfigError, config_from_dict
from stpnet.training.config_files import apply_overrides

PROCESSOR = STPNetImageProcessor(size={"height": 32, "width": 32})
DTYPES = [np.uint8, np.uint16, np.int8, np.int16, np.int32, np.int64, np.float16, np.float32, np.float64, np.bool_]
SIDES = st.integers(1, 40)


@st.composite
def arrays(draw: st.DrawFn) -> np.ndarray:
    """Arrays of every layout the processor may meet: (H, W), (H, W, C), (C, H, W), odd ranks and channel counts."""
    h, w = draw(SIDES), draw(SIDES)
    shape = draw(
        st.sampled_from([(h, w), (h, w, 1), (h, w, 3), (h, w, 4), (3, h, w), (1, h, w), (h, w, 2), (h, w, 5)])
        | st.lists(st.integers(0, 6), max_size=4).map(tuple)
    )
    dtype = draw(st.sampled_from(DTYPES))
    elements = None
    if np.issubdtype(dtype, np.floating):  # every value, NaN and ±inf included, or mostly [0, 1]
        elements = draw(st.sampled_from([st.floats(0, 1, width=16), st.floats(width=16, allow_subnormal=False)]))
    return draw(hnp.arrays(dtype, shape, elements=elements))


def image_ok(result, array_hw: tuple[int, int] | None = None) -> None:
    pixels = result["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32) and pixels.dtype == torch.float32 and torch.isfinite(pixels).all()
    unit = pixels * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    assert unit.min() >= -1e-4 and unit.max() <= 1 + 1e-4  # scaled to [0, 1] before normalising
    if array_hw is not None:
        assert tuple(result["original_sizes"][0].tolist()) == array_hw


TENSOR_DTYPES = [None, torch.bfloat16, torch.float16, torch.float64, torch.int8, torch.bool, torch.complex64]


@budget(60)
@given(arrays(), st.booleans(), st.sampled_from(TENSOR_DTYPES))
def test_any_array_or_tensor_gives_pixel_values_or_a_clear_error(array: np.ndarray, as_tensor: bool, cast) -> None:
    value = torch.from_numpy(array.copy()) if as_tensor and array.dtype != np.uint16 else array
    if isinstance(value, torch.Tensor) and cast is not None:
        value = value.to(cast)  # torch dtypes that numpy lacks (bfloat16) or reads otherwise
    result = outcome("image processor: arrays", lambda: PROCESSOR(value), (ValueError,), ["image 0", "images"])
    if result is not None:
        image_ok(result)


PIL_MODES = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "HSV", "LAB", "I;16", "I", "F", "La", "RGBa"]


@st.composite
def pil_images(draw: st.DrawFn) -> Image.Image:
    mode, w, h = draw(st.sampled_from(PIL_MODES)), draw(SIDES), draw(SIDES)
    data = draw(st.binary(min_size=0, max_size=64))
    image = Image.new(mode, (w, h))
    if mode == "F":
        values = draw(st.lists(st.floats(width=32), min_size=1, max_size=8))
        image = Image.fromarray(np.resize(np.array(values, dtype=np.float32), (h, w)), mode="F")
    elif data:
        raw = (data * (1 + len(image.tobytes()) // len(data)))[: len(image.tobytes())]
        image.frombytes(raw)
    return image


@budget(50)
@given(pil_images())
def test_any_pil_image_gives_pixel_values_or_a_clear_error(image: Image.Image) -> None:
    names = ["image 0", f"mode {image.mode}", "Float image"]
    result = outcome("image processor: PIL modes", lambda: PROCESSOR(image), (ValueError,), names)
    if result is not None:
        image_ok(result, (image.height, image.width))


@budget(60)
@given(arrays())
def test_any_mask_is_binarised_by_the_rule_or_refused(mask: np.ndarray) -> None:
    result = outcome("mask binarisation", lambda: mask_to_bool(mask, where="mask.png"), (ValueError,), ["mask.png"])
    if result is None:
        return
    values = mask if mask.ndim == 2 else None
    assert result.dtype == np.bool_ and result.ndim == 2
    if values is not None and np.issubdtype(values.dtype, np.number):
        assert result.shape == values.shape
        distinct = np.unique(values)
        if distinct.size == 2 and distinct[0] == 0:  # exactly {0, v}: the lesion is v, whatever v
            assert np.array_equal(result, values == distinct[1])


# ---------------------------------------------------------------------------------------------- descriptions
ZONE_WORDS = st.lists(
    st.sampled_from(["upper", "middle", "lower", "midlle", "all"]), min_size=1, max_size=3, unique=True
)


@st.composite
def lung_sentences(draw: st.DrawFn) -> str:
    """Sentences in the LViT/SGSeg grammar (often consistent, sometimes not), then maybe cut or mangled."""
    sides = draw(st.lists(st.sampled_from(["left", "right"]), min_size=1, max_size=2, unique=True))
    laterality = draw(st.sampled_from(["Unilateral", "Bilateral", "Trilateral"]))
    count = draw(st.sampled_from(["one infected area", "two infected areas", "six infected areas", "no area"]))
    places = " and ".join(f"{' '.join(draw(ZONE_WORDS))} {side} lung" for side in sides)
    text = f"{laterality} pulmonary infection, {count}, {places}."
    cut = draw(st.sampled_from([None, "cut", "insert"]))
    if cut == "cut":
        text = text[: draw(st.integers(0, len(text)))]
    elif cut == "insert":
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.text(max_size=5)) + text[at:]
    return text


@budget(80)
@given(lung_sentences() | st.text(max_size=60))
def test_any_lung_sentence_parses_or_is_refused_naming_the_row(text: str) -> None:
    result = outcome(
        "description parser", lambda: parse_lung_description(text, "Train_text.xlsx row 7"), (DataError,), ["row 7"]
    )
    if result is not None:
        assert set(result) == {"laterality", "count", "left_location", "right_location"}
        assert all(isinstance(v, str) and v for v in result.values())


CELLS = st.one_of(st.integers(-3, 8), st.floats(allow_nan=True), st.text(max_size=4), st.none(), st.booleans())
FLAGS = st.lists(st.sampled_from([0, 1]), min_size=6, max_size=6)


@st.composite
def qata_rows(draw: st.DrawFn) -> tuple:
    """(pulmonary_infection, infected_area, zones): consistent rows, rows with one cell off, or any cells."""
    flags = draw(FLAGS)
    sides = int(any(flags[:3])) + int(any(flags[3:]))
    row = [sides, sum(flags), " ".join(map(str, flags))]
    if draw(st.booleans()):
        row[draw(st.integers(0, 2))] = draw(CELLS | st.text(max_size=12))
    return tuple(row)


@budget(60)
@given(qata_rows())
def test_any_qata_row_gives_categories_or_a_clear_error(row: tuple) -> None:
    laterality, area, zones = row
    call = lambda: categories_from_zones(laterality, area, zones, "train_text.csv line 3")  # noqa: E731
    result = outcome("description parser: QaTa zones", call, (DataError,), ["line 3"])
    if result is not None:
        flags = [int(z) for z in zones.split()]
        assert sum(flags) == int(float(area)) and (result["count"] == "one infected area") == (sum(flags) == 1)


# ---------------------------------------------------------------------------------------------- config and --set
KEYS = ["train.lr", "train.epochs", "train.batch_size", "data.image_size", "model.preset", "train", "augment.enabled",
        "model.overrides.base_channels", "train.betas", "nope.key", "train.lr.x", "", "data", "output_dir"]  # fmt: skip
VALUES = ["1e-3", "3", "-1", "0", "true", "[0.9, 0.999]", "{a: 1}", "null", "'x'", "[", "{", "a: b: c", "1.5", "", "∞"]


@budget(80)
@given(st.lists(st.tuples(st.sampled_from(KEYS), st.sampled_from(VALUES) | st.text(max_size=12)), max_size=4))
def test_any_set_overrides_build_a_config_or_a_clear_error(pairs: list[tuple[str, str]]) -> None:
    overrides = [f"{key}={value}" for key, value in pairs]
    base = yaml.safe_load("train: {lr: 0.001, epochs: 2}\ndata: {dataset: x}\n")

    def build():
        return config_from_dict(apply_overrides(base, overrides))

    names = [key.split(".")[-1] for key, _ in pairs if key] + [value for _, value in pairs] + ["section.key=value"]
    result = outcome("--set overrides and config building", build, (ConfigError,), [n for n in names if n] or ["="])
    if result is not None:
        assert result.train.epochs >= 0 or result.train.max_steps


FRAGMENTS = [
    "train:", "  lr: 0.01", "  lr: x", "  epochs: -2", "data:", "  image_size: 33", "model: [1, 2]", "base: 3",
    "base: other.yaml", "train: {lr: 1, lr: 2}", "- a", "[", "\t", "augment:", "  enabled: maybe", "x: 1",
]  # fmt: skip


@budget(60)
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=6).map("\n".join) | st.text(max_size=40))
def test_any_config_file_loads_or_is_refused_naming_it(tmp_path_factory, text: str) -> None:
    from stpnet.training.config_files import load_train_config

    path = tmp_path_factory.mktemp("config") / "mine.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    names = ["mine.yaml", *re.findall(r"\w+", text)]
    outcome("config files", lambda: load_train_config(path), (ConfigError,), names)
