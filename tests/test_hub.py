"""hub_scripts/push_to_hub.py: the dry-run folder has the model card and loads through remote code in a clean
process (no network, no Hub)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
import yaml
from runs import ROOT, SAMPLE_CONFIG, hub_script
from safetensors import safe_open

from modeling_stpnet import STPNetForSemanticSegmentation, STPNetImageProcessor
from stpnet.model_card import results_note as note
from stpnet.training import build_stpnet_model, load_repository, load_train_config

PUSH = ROOT / "hub_scripts" / "push_to_hub.py"

CHECK = textwrap.dedent(
    """
    import sys


    class BlockPackage:
        # An editable install of this repo (scripts/setup_env.sh) makes the package importable even under
        # python -I; block it so that only the checkpoint's own code can be used.

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "modeling_stpnet":
                raise ImportError(f"{name} is blocked in this check")
            return None


    sys.meta_path.insert(0, BlockPackage())
    try:
        import modeling_stpnet
        sys.exit("modeling_stpnet is importable: the remote-code check would prove nothing")
    except ImportError:
        pass
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel
    folder = sys.argv[1]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    with torch.no_grad():
        logits = model(torch.load(sys.argv[2])).logits
    assert torch.allclose(logits, torch.load(sys.argv[3]), atol=1e-4), (logits - torch.load(sys.argv[3])).abs().max()
    inputs = processor(Image.new("RGB", (90, 70), (120, 50, 40)))
    with torch.no_grad():
        out = model(pixel_values=inputs["pixel_values"])
    assert processor.post_process_semantic_segmentation(out, target_sizes=[(70, 90)])[0].shape == (70, 90)
    print(processor.post_process_description(out, model.config)[0]["description"])
    print("REMOTE OK")
    """
)


def run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_dry_run_folder_has_the_card_and_loads_with_remote_code(tmp_path: Path) -> None:
    config = load_train_config(SAMPLE_CONFIG, ["data.image_size=64", "model.overrides={base_channels: 8}"])
    torch.manual_seed(0)
    model = build_stpnet_model(config, load_repository(config)).eval()
    best = tmp_path / "run" / "best"
    model.save_pretrained(best)
    STPNetImageProcessor(size={"height": 64, "width": 64}).save_pretrained(best)
    (best / "train_config.yaml").write_text(config.to_yaml())
    (best / "selection.json").write_text(json.dumps({"step": 40, "train_examples": 32, "validation_examples": 8}))
    metrics = {"dice": 0.8123, "iou": 0.7012, "micro_dice": 0.8, "micro_iou": 0.69, "num_images": 8, "split": "test"}
    metrics.update(input_resolution={"dice": 0.81}, retrieval_accuracy={"mean": 0.5}, dataset="sample/kvasir-seg-mini")
    (tmp_path / "run" / "test").mkdir()
    (tmp_path / "run" / "test" / "metrics.json").write_text(json.dumps(metrics))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.save(model(x).logits, tmp_path / "logits.pt")
    torch.save(x, tmp_path / "x.pt")

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_PROGRESS_BARS="1")
    folder = tmp_path / "upload"
    result = run([sys.executable, str(PUSH), "--model", str(best), "--dry-run", str(folder)], tmp_path, env)
    assert result.returncode == 0, result.stdout + result.stderr  # metrics found next to the checkpoint

    files = {p.name for p in folder.iterdir()}
    assert {"README.md", "metrics.json", "config.json", "model.safetensors", "preprocessor_config.json"} <= files
    assert {"modeling_stpnet.py", "configuration_stpnet.py", "train_config.yaml"} <= files
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlicense: other\nlicense_name: kvasir-seg\n") and "${" not in card
    # the bundled sample: sizes stated, a pipeline check and no results widget that would read like a benchmark
    assert "model-index" not in card and "| Dice (per-image mean) | 0.8123 |" in card
    assert "**A pipeline check, not a result.**" in card and "trained on 32 images downsized" in card
    assert "trained on **the Kvasir-SEG sample bundled with STPNet** (32 images for training, 8 images for" in card
    assert "Jha" in card and "shan2025stpnet" in card and "Limitations" in card and "Intended use" in card
    assert ", 40 epochs, seed 0, augmentation on;" in card
    assert "Split `test` was never used for selection or early stopping." in card

    (tmp_path / "check.py").write_text(CHECK)
    check = [sys.executable, "-I", str(tmp_path / "check.py"), str(folder), str(tmp_path / "x.pt")]
    result = run([*check, str(tmp_path / "logits.pt")], tmp_path, env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "REMOTE OK" in result.stdout

    # the committed checkpoint's way: half-precision weights, this version's code, the sample's score in the card
    stale = best / "modeling_stpnet.py"
    stale.write_text(stale.read_text() + "\n# stale copy\n")
    (tmp_path / "sample.json").write_text(json.dumps({"dice": 0.5432, "num_images": 8}))
    packed = tmp_path / "packed"
    options = ["--weights-dtype", "float16", "--refresh-code", "--sample-metrics", str(tmp_path / "sample.json")]
    result = run([sys.executable, str(PUSH), "--model", str(best), "--dry-run", str(packed), *options], tmp_path, env)
    assert result.returncode == 0, result.stdout + result.stderr
    with safe_open(str(packed / "model.safetensors"), "pt") as handle:
        assert {handle.get_tensor(k).dtype for k in handle.keys()} <= {torch.float16, torch.int64}
    assert json.loads((packed / "config.json").read_text())["dtype"] == "float32"
    package = ROOT / "modeling_stpnet" / "modeling_stpnet.py"
    assert (packed / "modeling_stpnet.py").read_text() == package.read_text()
    assert "| Dice on the bundled sample's 8 test images" in (packed / "README.md").read_text()
    assert json.loads((packed / "sample_metrics.json").read_text())["dice"] == 0.5432
    reloaded = STPNetForSemanticSegmentation.from_pretrained(packed).eval()
    assert reloaded.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, torch.load(tmp_path / "logits.pt"), atol=0.05, rtol=0.05)

    no_metrics = run(
        [sys.executable, str(PUSH), "--model", str(best), "--metrics", "nope.json", "--dry-run", "x"], tmp_path, env
    )
    assert no_metrics.returncode == 2 and "No metrics found" in no_metrics.stderr
    no_target = run([sys.executable, str(PUSH), "--model", str(best)], tmp_path, env)
    assert no_target.returncode == 2 and "--repo-id" in no_target.stderr


class FakeHfApi:
    """Stands in for huggingface_hub.HfApi (no network here): records the calls and the uploaded files."""

    calls: list[tuple[str, dict]] = []
    fail_with: Exception | None = None

    def create_repo(self, repo_id: str, **kwargs) -> None:
        if FakeHfApi.fail_with is not None:
            raise FakeHfApi.fail_with
        FakeHfApi.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, folder_path: str, repo_id: str, **kwargs) -> None:
        files = sorted(p.name for p in Path(folder_path).iterdir())
        FakeHfApi.calls.append(("upload_folder", {"repo_id": repo_id, "files": files, **kwargs}))


def test_card_of_a_full_run_states_sizes_licence_and_weak_retrieval(tmp_path: Path) -> None:
    config = load_train_config(SAMPLE_CONFIG, ["data.image_size=64", "model.overrides={base_channels: 8}"])
    config.data.dataset = "outputs/data/kvasir-seg"
    model = build_stpnet_model(config, load_repository(config))
    best = tmp_path / "run" / "best"
    model.save_pretrained(best)
    (best / "train_config.yaml").write_text(config.to_yaml())
    # no selection.json (an older checkpoint): the sizes come from the run's run.json
    (tmp_path / "run" / "run.json").write_text(json.dumps({"train_examples": 792, "validation_examples": 88}))
    accuracy = {"count": 0.9, "size": 0.6, "horizontal": 0.3, "vertical": 0.41, "mean": 0.5525}
    floor = {"count": 0.942, "size": 0.4, "horizontal": 0.408, "vertical": 0.358, "mean": 0.527}
    metrics = {"dice": 0.75, "iou": 0.65, "num_images": 120, "split": "test", "dataset": "outputs/data/kvasir-seg"}
    metrics.update(retrieval_accuracy=accuracy, retrieval_majority_baseline=floor)
    push = hub_script("push_to_hub")
    card = (push.build_folder(best, metrics, "me/stpnet-kvasir", tmp_path / "hub") / "README.md").read_text()
    front_matter = yaml.safe_load(card.split("---")[1])
    assert front_matter["license"] == "other" and front_matter["license_link"].startswith("https://datasets.simula")
    results = front_matter["model-index"][0]["results"][0]
    assert results["dataset"]["name"] == "Kvasir-SEG" and results["metrics"][0]["value"] == 0.75
    assert "pipeline check" not in card and "(792 images for training, 88 images for checkpoint" in card
    assert "trained on 792 images of split `train`, checkpoint selected on 88 images" in card
    assert "The code (the STPNet package's `*.py` files" in card and "is Apache-2.0" in card
    assert "research and education" in card and "does not extend to the weights" in card
    assert "| count | 0.9000 | 0.9420 | **at or below the floor** |" in card
    assert "| size | 0.6000 | 0.4000 |  |" in card
    assert "does not beat the floor for `count`, `horizontal`:" in card  # the mean beats its floor


def test_card_says_whether_the_reported_split_selected_the_checkpoint() -> None:
    # QaTa-COV19 recipe: selected on a carve of train, reported on the official validation split
    carved = {"validation_split": "validation", "validation_from_train": 0.1}
    assert note(carved, "validation") == "Split `validation` was never used for selection or early stopping."
    selected_on_it = {"validation_split": "validation", "validation_from_train": 0.0}
    assert "also used to select the checkpoint" in note(selected_on_it, "validation")
    assert "never used" in note(selected_on_it, "test")
    assert "also used to select" in note({"validation_split": "test"}, "test")  # selecting on test is flagged too
    assert "not recorded" in note(None, "test")


def test_upload_sends_the_dry_run_folder(tmp_path: Path, monkeypatch, capsys) -> None:
    import huggingface_hub

    push = hub_script("push_to_hub")
    config = load_train_config(SAMPLE_CONFIG, ["data.image_size=64", "model.overrides={base_channels: 8}"])
    best = tmp_path / "run" / "best"
    build_stpnet_model(config, load_repository(config)).save_pretrained(best)
    (tmp_path / "metrics.json").write_text(json.dumps({"dice": 0.5, "iou": 0.4, "num_images": 2, "split": "test"}))
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    FakeHfApi.calls.clear()

    args = ["--model", str(best), "--metrics", str(tmp_path / "metrics.json"), "--repo-id", "me/stpnet-x"]
    assert push.main([*args, "--private"]) == 0
    assert push.main([*args, "--dry-run", str(tmp_path / "dry")]) == 0
    (create, create_args), (upload, upload_args) = FakeHfApi.calls
    assert (create, upload) == ("create_repo", "upload_folder")
    assert create_args == {"repo_id": "me/stpnet-x", "private": True, "exist_ok": True, "repo_type": "model"}
    assert upload_args["repo_id"] == "me/stpnet-x"
    assert upload_args["files"] == sorted(p.name for p in (tmp_path / "dry").iterdir())
    assert "README.md" in upload_args["files"] and "model.safetensors" in upload_args["files"]

    FakeHfApi.fail_with = OSError("Connection refused")
    try:
        assert push.main(args) == 1
    finally:
        FakeHfApi.fail_with = None
    err = capsys.readouterr().err
    assert "upload to https://huggingface.co/me/stpnet-x failed: Connection refused" in err and "--dry-run" in err
