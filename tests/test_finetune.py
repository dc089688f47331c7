"""Fine-tuning a trained checkpoint (``model.init_from``): which weights carry over, which are adapted or started
afresh, the errors for checkpoints that do not fit, and the model card's lineage (CPU, offline)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from runs import SAMPLE_CONFIG, hub_script, tiny_overrides
from safetensors.torch import load_file

from benchmarks.unet import UNetConfig, UNetForSemanticSegmentation
from modeling_stpnet import STPNetForSemanticSegmentation
from stpnet.inference.predict import load_checkpoint
from stpnet.training import ConfigError, load_train_config, run_training
from stpnet.training.model import build_stpnet_model, load_initial_weights, load_repository

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


@pytest.fixture(scope="module")
def checkpoint(tiny_dataset: Path, tmp_path_factory) -> Path:
    """A trained tiny STPNet (Kvasir-SEG text, 64 px) whose processor has its own normalisation."""
    run = tmp_path_factory.mktemp("pretrained")
    run_training(load_train_config(SAMPLE_CONFIG, tiny_overrides(tiny_dataset, run, **{"train.epochs": 1})))
    processor_file = run / "best" / "preprocessor_config.json"
    settings = json.loads(processor_file.read_text())
    processor_file.write_text(json.dumps({**settings, "image_mean": MEAN, "image_std": STD}))
    return run / "best"


def finetune_config(dataset: Path, output: Path, checkpoint: Path, **extra):
    settings = {"model.init_from": str(checkpoint), "model.overrides": "{}", **extra}
    return load_train_config(SAMPLE_CONFIG, tiny_overrides(dataset, output, **settings))


def build(config) -> tuple[torch.nn.Module, list[str]]:
    initial = load_initial_weights(config)
    return build_stpnet_model(config, load_repository(config), initial), initial.notes


def test_fine_tuning_starts_from_every_weight_and_keeps_the_normalisation(
    checkpoint: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    saved = load_file(checkpoint / "model.safetensors")
    # the architecture is the checkpoint's: the preset (stpnet-tiny, base 16, ResNet-18) is not used
    config = finetune_config(tiny_dataset, tmp_path / "run", checkpoint, **{"model.preset": "stpnet-paper"})
    model, notes = build(config)
    state = model.state_dict()
    assert state.keys() == saved.keys()
    assert all(torch.equal(state[key], saved[key]) for key in saved), "a weight was not carried over"
    assert "not used" in notes[0] and f"{len(saved) - 4} of {len(saved)} weight tensors loaded" in notes[1]

    result = run_training(config)
    best = Path(result["best_dir"])
    # its recipe names stpnet-paper (8 heads), which it never used: the checked loader must not hold that against it
    assert load_checkpoint(best)[0].config.num_attention_heads == 4
    tuned = load_file(best / "model.safetensors")
    assert json.loads((best / "config.json").read_text())["base_channels"] == 8
    assert any(not torch.equal(tuned[key], saved[key]) for key in saved), "fine-tuning changed nothing"
    processor = json.loads((best / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == MEAN and processor["image_std"] == STD and processor["size"]["height"] == 64
    assert yaml.safe_load((tmp_path / "run" / "train_config.yaml").read_text())["model"]["init_from"] == str(checkpoint)


def test_another_repository_and_size_adapt_only_what_they_change(checkpoint: Path, tiny_dataset: Path) -> None:
    saved = load_file(checkpoint / "model.safetensors")
    config = finetune_config(
        tiny_dataset, tiny_dataset.parent / "unused", checkpoint, **{"text.definition": "qata-cov19"}
    )
    config.data.image_size = 96  # token grid 6x6 instead of 4x4
    model, notes = build(config)
    state = model.state_dict()
    fresh = {key for key in state if key.startswith(("retrieval.classifiers.", "text_embeddings_"))}
    positions = {key for key in state if key.startswith("utrans.position_embeddings.")}
    assert all(state[key].shape[-2:] == (6, 6) for key in positions)
    assert all(torch.equal(state[key], saved[key]) for key in state.keys() - fresh - positions)
    # QaTa-COV19's four categories hold other sentences (and counts), so every sentence classifier starts afresh
    classifiers = [key for key in fresh if key.endswith("2.weight")]
    assert len(classifiers) == 4
    assert all(state[k].shape != saved[k].shape or not torch.equal(state[k], saved[k]) for k in classifiers)
    assert any("resampled" in note for note in notes)
    assert any("re-initialised" in note and "laterality" in note for note in notes)


def test_another_size_starts_as_the_checkpoint_computes_at_that_size(checkpoint: Path, tiny_dataset: Path) -> None:
    config = finetune_config(tiny_dataset, tiny_dataset.parent / "unused", checkpoint, **{"data.image_size": 96})
    model, notes = build(config)
    original = STPNetForSemanticSegmentation.from_pretrained(checkpoint).eval()
    pixels = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tuned, expected = model.eval()(pixels), original(pixels)
    assert model.config.image_size == 96 and original.config.image_size == 64
    assert torch.allclose(tuned.logits, expected.logits, atol=1e-4)
    for a, b in zip(tuned.retrieval_logits, expected.retrieval_logits):
        assert torch.allclose(a, b, atol=1e-4)
    assert any("resampled to data.image_size=96" in note for note in notes)


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        (
            {"model.overrides": "{base_channels: 16}"},
            r"(?s)do not fit.*\d+ weight\(s\) of another shape: text_projections.0.weight \(8, 384\) in the c",
        ),
        ({"model.overrides": "{use_ssa: false}"}, r"weight\(s\) in the checkpoint but not in the model: ssa\."),
        ({"text.encoder": "bert-base-uncased"}, r"encoded its text repository with 'sentence-transformers/all-MiniLM"),
        ({"model.init_from": "./no/such/checkpoint"}, r"model.init_from='./no/such/checkpoint'"),
        ({"model.init_from": "' '"}, r"model.init_from must be a checkpoint folder or Hub id"),
    ],
)
def test_checkpoints_that_do_not_fit_are_refused(
    checkpoint: Path, tiny_dataset: Path, tmp_path: Path, settings: dict, match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        config = finetune_config(tiny_dataset, tmp_path / "run", checkpoint, **settings)
        build(config)
    assert not (tmp_path / "run").exists()


def test_train_script_takes_init_from(checkpoint: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    cli = hub_script("train")
    settings = tiny_overrides(tiny_dataset, tmp_path / "run", **{"model.overrides": "{}", "train.epochs": 1})
    args = ["--config", str(SAMPLE_CONFIG), *(a for o in settings for a in ("--set", o))]
    assert cli.main([*args, "--init-from", str(checkpoint)]) == 0
    assert (
        load_file(tmp_path / "run" / "best" / "model.safetensors").keys()
        == load_file(checkpoint / "model.safetensors").keys()
    )
    assert yaml.safe_load((tmp_path / "run" / "train_config.yaml").read_text())["model"]["init_from"] == str(checkpoint)


def test_init_from_with_another_model_factory_is_refused(checkpoint: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    config = finetune_config(tiny_dataset, tmp_path / "run", checkpoint)
    with pytest.raises(ConfigError, match="cannot start another model_factory"):
        run_training(config, model_factory=lambda *_: UNetForSemanticSegmentation(UNetConfig(base_channels=8)))


def test_model_card_names_the_base_model(checkpoint: Path, tmp_path: Path) -> None:
    push = hub_script("push_to_hub")
    metrics = {"dice": 0.5, "iou": 0.4, "split": "test", "num_images": 4}
    for init_from, base_model in (("org/stpnet-kvasir", "org/stpnet-kvasir"), (str(checkpoint), None)):
        folder = tmp_path / f"model-{base_model is None}"
        shutil.copytree(checkpoint, folder)
        train = yaml.safe_load((folder / "train_config.yaml").read_text())
        train["model"]["init_from"] = init_from
        (folder / "train_config.yaml").write_text(yaml.safe_dump(train))
        card = (push.build_folder(folder, metrics, "me/stpnet-tuned", tmp_path / f"hub-{base_model is None}")).joinpath(
            "README.md"
        )
        text = card.read_text()
        front_matter = yaml.safe_load(text.split("---")[1])
        assert front_matter.get("base_model") == base_model  # a local folder is no Hub id to link to
        assert f"fine-tuned from `{init_from}`" in text
