"""Helpers shared by the benchmarks: model rows by name, machine description, peak memory, results files."""

from __future__ import annotations

import json
import os
import platform
import resource
import shlex
import statistics
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from benchmarks.summary import DEFAULT_PRESETS_DIR, load_presets  # noqa: E402
from benchmarks.unet import UNetConfig, UNetForSemanticSegmentation  # noqa: E402
from modeling_stpnet import STPNetConfig, STPNetForSemanticSegmentation  # noqa: E402
from stpnet.cpu_memory import M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, glibc  # noqa: E402

RESULTS_DIR = ROOT / "benchmarks" / "results"


# ---------------------------------------------------------------------------------------------------- model names
def unet_name(base_channels: int) -> str:
    """`unet` is the base-64 U-Net (stpnet-paper's width); other widths say theirs: `unet-c32`, `unet-c16`."""
    return "unet" if base_channels == 64 else f"unet-c{base_channels}"


# The encoder and decoder settings a U-Net baseline takes from the STPNet preset it is compared with.
BACKBONE_FIELDS = ("backbone", "backbone_config", "use_pretrained_backbone", "backbone_kwargs", "decoder_channels")


def unet_for(preset: str, config: STPNetConfig) -> str:
    """The U-Net row compared with a preset: `unet-<encoder>` on a backbone preset (`stpnet-mobilenetv2` →
    `unet-mobilenetv2`), else the U-Net of the preset's width."""
    if config.backbone_config is not None:
        return "unet-" + preset.removeprefix("stpnet-").removesuffix("-shared")
    return unet_name(config.base_channels)


def unet_config(config: STPNetConfig, **extra: Any) -> UNetConfig:
    """The U-Net with the preset's encoder (width or backbone) and decoder."""
    return UNetConfig(base_channels=config.base_channels, **{k: getattr(config, k) for k in BACKBONE_FIELDS}, **extra)


def variant_name(preset: str, variant: str) -> str:
    """`stpnet-<preset>` plus `-shared`, `-no-text` or `-no-ssa`; presets are already called `stpnet-...`."""
    base = preset if preset.startswith("stpnet") else f"stpnet-{preset}"
    return base if variant == "default" else f"{base}-{variant}"


VARIANT_OVERRIDES: dict[str, dict[str, Any]] = {
    "default": {},
    # explicit, so results of runs from before the detach default (whose configs lack it) are not reused
    "shared": {"retrieval_backbone": "shared", "shared_retrieval_detach": True},
    "no-text": {"use_text": False},
    "no-ssa": {"use_ssa": False},
}


def preset_configs(names: list[str] | None, presets_dir: str | Path = DEFAULT_PRESETS_DIR) -> dict[str, STPNetConfig]:
    """Preset configs by name (all of them when `names` is empty); raises naming the unknown ones."""
    presets = load_presets(presets_dir)
    if not names:
        return presets
    unknown = [n for n in names if n not in presets]
    if unknown:
        raise SystemExit(f"Unknown preset(s) {unknown}; known: {sorted(presets)}")
    return {n: presets[n] for n in names}


def variant_config(config: STPNetConfig, variant: str, **extra: Any) -> STPNetConfig:
    """A copy of the preset config with the variant's (and any extra) fields changed."""
    values = {**config.to_diff_dict(), **VARIANT_OVERRIDES[variant], **extra}
    values.pop("auto_map", None)
    values.pop("transformers_version", None)
    return STPNetConfig(**values)


def model_specs(
    presets: dict[str, STPNetConfig], variants: list[str]
) -> list[tuple[str, str, Callable[[], torch.nn.Module]]]:
    """`(name, unet_reference, build)` for one U-Net per width in use, then every preset x variant.

    `build` makes a fresh randomly initialised model (seeded, so repeated builds are identical); text embeddings
    stay the deterministic placeholders, which cost the same as encoded ones.
    """
    specs: list[tuple[str, str, Callable[[], torch.nn.Module]]] = []
    unets = {unet_for(p, c): c for p, c in sorted(presets.items(), key=lambda item: -item[1].base_channels)}
    for name, config in unets.items():

        def build_unet(config: STPNetConfig = config) -> torch.nn.Module:
            torch.manual_seed(0)
            return UNetForSemanticSegmentation(unet_config(config))

        specs.append((name, name, build_unet))
    for preset, config in presets.items():
        for variant in variants:
            if variant == "shared" and config.retrieval_backbone == "shared":
                continue

            def build_stpnet(config: STPNetConfig = config, variant: str = variant) -> torch.nn.Module:
                torch.manual_seed(0)
                return STPNetForSemanticSegmentation(variant_config(config, variant))

            specs.append((variant_name(preset, variant), unet_for(preset, config), build_stpnet))
    return specs


def describe_model(model: torch.nn.Module) -> dict[str, Any]:
    cfg = model.config
    return {
        "base_channels": None if cfg.backbone_config else cfg.base_channels,
        "backbone": cfg.backbone,
        "retrieval_backbone": getattr(cfg, "retrieval_backbone", None) if getattr(cfg, "use_text", False) else None,
        "use_text": getattr(cfg, "use_text", None),
        "use_ssa": getattr(cfg, "use_ssa", None),
    }


# Arguments that record what a model holds rather than how it is built (the digest of the sentences its stored
# text embeddings came from is set when they are stored, after the config is built).
NOT_SETTINGS = {"self", "text_embeddings_fingerprint"}


def model_settings(config: Any) -> dict[str, Any]:
    """The settings a model config class defines itself (the named arguments of its `__init__`), JSON-normalised.

    They decide the architecture, the init and the losses; transformers' own metadata (version, auto_map, dtype) is
    left out, so a run's saved `config.json` and a config built now compare equal exactly when they build alike.
    `model_type` names the class the settings belong to.
    """
    names = [name for name in type(config).field_names() if name not in NOT_SETTINGS]
    values = config.to_dict()
    return json.loads(json.dumps({"model_type": config.model_type, **{name: values.get(name) for name in names}}))


def model_settings_changes(
    saved: dict[str, Any], expected: dict[str, Any], keys: Iterable[str] | None = None
) -> dict[str, tuple[str, str]]:
    """`{key: (saved value, expected value)}` (as JSON text) for each of `keys` (default: every setting of
    `expected`) that the two hold differently. A missing key (`"absent"`) means the run predates the setting, so the
    default it was built with is unknown: it counts as changed."""

    def shown(settings: dict[str, Any], key: str) -> str:
        return json.dumps(settings[key]) if key in settings else "absent"

    return {
        key: (shown(saved, key), shown(expected, key))
        for key in (expected if keys is None else sorted(keys))
        if shown(saved, key) != shown(expected, key)
    }


# ---------------------------------------------------------------------------------------------------- machine
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "load_average_1_5_15_min_at_start": load_average(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


# ---------------------------------------------------------------------------------------------------- memory
class PeakMemory:
    """Peak extra memory of a block of work, in MiB.

    CPU (Linux): glibc's mmap threshold is pinned at 1 MiB so every tensor buffer is mapped and returned to the
    kernel when freed; the kernel's resident high-water mark (VmHWM) is reset through `/proc/self/clear_refs`
    before the work and read after it: peak = VmHWM - resident size before. Elsewhere: `ru_maxrss` delta (only
    grows, so it under-reports after a bigger earlier step). CUDA: `torch.cuda.max_memory_allocated` delta.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = self._setup()

    def _setup(self) -> str:
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated - memory_allocated before"
        libc = glibc()
        if libc is not None and os.access("/proc/self/clear_refs", os.W_OK):
            libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)  # freed tensors really leave the process
            self._libc = libc
            return "Linux VmHWM (reset via /proc/self/clear_refs) - VmRSS before; glibc mmap threshold 1 MiB"
        return "resource.getrusage ru_maxrss delta (monotone high-water mark; may under-report)"

    @staticmethod
    def _status_kib(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
        raise KeyError(key)

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
        elif self.method.startswith("Linux"):
            self._libc.malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")
            self._before = self._status_kib("VmRSS") * 1024
        else:
            self._before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def close(self) -> None:
        """Give the process back glibc's steady-state behaviour (the dynamic threshold cannot be re-enabled: its
        ceiling, 32 MiB, with a trim threshold twice that, is where it settles for large tensors)."""
        if hasattr(self, "_libc"):
            self._libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
            self._libc.mallopt(M_TRIM_THRESHOLD, 64 << 20)

    def stop(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.method.startswith("Linux"):
            peak = self._status_kib("VmHWM") * 1024
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return max(0.0, (peak - self._before) / 2**20)


# ---------------------------------------------------------------------------------------------------- results
def write_results(path: Path, payload: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def paired_ratio(times: list[float], reference: list[float]) -> tuple[float, float, float]:
    """`(median, p25, p75)` of same-round ratios `times[i] / reference[i]`.

    The median is robust to load that changes between rounds; the quartiles say how far single rounds moved, which
    is what a reader needs to judge a difference of a few percent between two ratios.
    """
    ratios = [t / r for t, r in zip(times, reference, strict=True)]
    if len(ratios) < 2:
        return ratios[0], ratios[0], ratios[0]
    p25, median, p75 = statistics.quantiles(ratios, n=4, method="inclusive")
    return median, p25, p75


def format_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]], markdown: bool = False) -> str:
    """Plain-text (or Markdown) table; `columns` are `(key, header, format)`; missing values print as `-`."""

    def cell(row: dict[str, Any], key: str, fmt: str) -> str:
        value = row.get(key)
        if value is None:
            return "-"
        return format(value, fmt) if fmt else str(value)

    cells = [[cell(r, k, f) for k, _, f in columns] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells])
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, (_, h, _) in enumerate(columns)]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, ((_, h, _), w) in enumerate(zip(columns, widths)))]
    for c in cells:
        lines.append("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(c, widths))))
    return "\n".join(lines)
