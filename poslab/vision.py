"""2-D positions: a small Vision Transformer trained at one patch grid, tested on larger ones.

The images are generated, so every resolution is native (no download, no resampling): one
shape per image (a square, a disc, a cross or a diamond, :data:`SHAPES`), of random size
and place, defined in unit coordinates and rasterized at ``patch * grid`` pixels, with a
little noise; the label is the shape. A model trained on ``train_grid x train_grid``
patches is tested on larger grids of the same patch size (the same shapes at a higher
resolution), so only the positions are new.

Position ids: encodings that read two ids per token (``rope_2d``, ``seqpe`` with
``dims = 2``) get ``(row, column)``; one-id encodings get ``row * stride + column`` with one
``stride`` (the largest grid) at every grid, so a patch keeps its id when the grid grows.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, model_validator
from torch import Tensor, nn
from torch.nn import functional as F

from poslab import pe as pe_lib
from poslab.loop import StepLoss, train_loop
from poslab.model import Transformer, transformer_config

__all__ = [
    "SHAPES",
    "render_shapes",
    "patchify",
    "grid_ids",
    "ViTConfig",
    "VisionTransformer",
    "run_vit",
    "run_vit_study",
]

SHAPES = ("square", "ring", "cross", "bars")


def render_shapes(n: int, size: int, generator: torch.Generator, noise: float = 0.1) -> tuple[Tensor, Tensor]:
    """``n`` images ``(n, size, size)`` in [0, 1] plus noise, and their labels ``(n,)``."""
    labels = torch.randint(0, len(SHAPES), (n,), generator=generator)
    radius = 0.25 + 0.15 * torch.rand(n, generator=generator)
    center = radius[:, None] + (1 - 2 * radius[:, None]) * torch.rand(n, 2, generator=generator)
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    dy = coords[None, :, None] - center[:, 0, None, None]
    dx = coords[None, None, :] - center[:, 1, None, None]
    r = radius[:, None, None]
    square = (dx.abs() <= r * 0.8) & (dy.abs() <= r * 0.8)
    ring = (dx**2 + dy**2 <= r**2) & (dx**2 + dy**2 >= (0.55 * r) ** 2)
    cross = ((dx.abs() <= r / 3) & (dy.abs() <= r)) | ((dy.abs() <= r / 3) & (dx.abs() <= r))
    bars = (dx.abs() <= r) & ((dy - r * 0.6).abs() <= r / 4) | (dx.abs() <= r) & ((dy + r * 0.6).abs() <= r / 4)
    masks = torch.stack((square, ring, cross, bars), dim=1)  # (n, 4, size, size)
    images = masks[torch.arange(n), labels].float()
    images = images + noise * torch.randn(images.shape, generator=generator)
    return images, labels


def patchify(images: Tensor, patch: int) -> Tensor:
    """``(n, S, S)`` -> ``(n, G * G, patch * patch)`` in row-major patch order."""
    n, s, _ = images.shape
    if s % patch:
        raise ValueError(f"image size {s} is not a multiple of patch={patch}")
    g = s // patch
    return images.view(n, g, patch, g, patch).permute(0, 1, 3, 2, 4).reshape(n, g * g, patch * patch)


def grid_ids(grid: int, two_d: bool, stride: int) -> Tensor:
    """Position ids of a ``grid x grid`` patch grid: ``(1, G*G, 2)`` or ``(1, G*G)``."""
    rows = torch.arange(grid).repeat_interleave(grid)
    cols = torch.arange(grid).repeat(grid)
    if two_d:
        return torch.stack((rows, cols), dim=-1)[None]
    return (rows * stride + cols)[None]


class ViTConfig(BaseModel):
    """One Vision Transformer run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pe: pe_lib.EncodingName = "rope_2d"
    pe_params: dict[str, Any] = Field(default_factory=dict)
    patch: int = Field(4, gt=0)
    train_grid: int = Field(4, gt=0)
    test_grids: list[PositiveInt] = Field(default_factory=lambda: [4, 6, 8], min_length=1)
    d_model: int = Field(64, gt=0)
    num_layers: int = Field(4, gt=0)
    num_heads: int = Field(4, gt=0)
    steps: int = Field(1500, gt=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(1e-3, gt=0)
    test_examples: int = Field(500, gt=0)
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _model(self) -> ViTConfig:
        self.body_config()  # the encoding checks its parameters here, before any work
        return self

    def body_config(self):
        """The :class:`~poslab.model.TransformerConfig` of the ViT's body (validated)."""
        # room past the test grids (SeqPE: for its distillation windows and random shift)
        sized = pe_lib.get(self.pe).sized_for(
            max_position=max(self.stride, 4 * self.train_grid), dims=2, train_extent=self.train_grid
        )
        return transformer_config(
            self, vocab_size=len(SHAPES), causal=False, pe_params={**sized, **self.pe_params},
            max_seq_len=self.stride**2, tie_embeddings=False,
        )  # fmt: skip

    @property
    def stride(self) -> int:
        return max(self.test_grids + [self.train_grid])


class VisionTransformer(nn.Module):
    """Patch embedding + poslab's bidirectional Transformer + mean-pooled class logits."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.patch_embed = nn.Linear(cfg.patch * cfg.patch, cfg.d_model)
        self.body = Transformer(cfg.body_config())
        self.two_d = self.body.pe.position_dims == 2
        self.stride = cfg.stride

    def forward(self, patches: Tensor, grid: int, position_ids: Tensor | None = None) -> Tensor:
        """Class logits; ``position_ids`` default to :func:`grid_ids` of ``grid``."""
        ids = grid_ids(grid, self.two_d, self.stride).to(patches.device) if position_ids is None else position_ids
        return self.body(None, position_ids=ids, inputs_embeds=self.patch_embed(patches)).mean(1)

    def training_ids(self, grid: int, generator: torch.Generator) -> tuple[Tensor, object, bool]:
        """The ids of one training step, with the encoding's random shift (SeqPE's) applied:
        ``(ids, span, shifted)``; ``span`` is the grid ``(G, G)`` for 2-D ids."""
        ids = grid_ids(grid, self.two_d, self.stride)
        pe = self.body.pe
        span = (grid, grid) if self.two_d else int(ids.max()) + 1
        offset = pe.training_offset(span, generator)
        if offset is None:
            return ids, span, False
        return ids + torch.tensor(offset if self.two_d else offset[0]), span, True


def run_vit(cfg: ViTConfig, *, progress: bool = True) -> dict:
    """Train at ``train_grid``, return accuracy per test grid (held-out generated images)."""
    torch.manual_seed(cfg.seed)
    model = VisionTransformer(cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.06)
    size = cfg.patch * cfg.train_grid

    def step_loss(step: int) -> StepLoss:
        images, labels = render_shapes(cfg.batch_size, size, gen)
        ids, span, shifted = model.training_ids(cfg.train_grid, gen)
        loss = F.cross_entropy(model(patchify(images, cfg.patch), cfg.train_grid, ids), labels)
        return StepLoss(loss, span, shifted)

    t0 = time.perf_counter()
    losses = train_loop(model, model.body.pe, step_loss, opt=opt, sched=sched, steps=cfg.steps, generator=gen,
                        grad_clip=1.0, progress=progress, desc=f"vit/{cfg.pe}")  # fmt: skip
    accuracy = {}
    with torch.no_grad():
        for grid in cfg.test_grids:
            test_gen = torch.Generator().manual_seed(10_000 + grid)  # the same test images for every model
            images, labels = render_shapes(cfg.test_examples, cfg.patch * grid, test_gen)
            pred = torch.cat([model(patchify(images[i : i + 250], cfg.patch), grid).argmax(-1)
                              for i in range(0, cfg.test_examples, 250)])  # fmt: skip
            accuracy[str(grid)] = (pred == labels).float().mean().item()
    from poslab.runner import loss_curve

    return {
        "config": cfg.model_dump(),
        "accuracy": accuracy,
        "train": {"seconds": round(time.perf_counter() - t0, 1), "final_loss": sum(losses[-50:]) / len(losses[-50:]),
                  "loss_curve": loss_curve(losses)},
    }  # fmt: skip


def run_vit_study(path: str | Path, *, progress: bool = True) -> dict:
    """A TOML study: ``name``, ``out``, ``seeds``, ``[base]`` ViT fields and ``[[variant]]``
    tables (``pe``, ``pe_params``, ``label``). Finished runs (``out/<label>_seed<k>.json``)
    are reused; writes ``report.md`` and ``results.json``."""
    from poslab.config import format_validation_error, load_toml

    spec = load_toml(path)

    unknown = set(spec) - {"name", "out", "seeds", "base", "variant"}
    if unknown or "variant" not in spec or "out" not in spec:
        raise ValueError(f"vit study {path}: needs out and [[variant]] tables; unknown keys {sorted(unknown)}")
    runs = []
    for variant in spec["variant"]:
        label = str(variant.get("label", variant.get("pe", spec.get("base", {}).get("pe", "rope_2d"))))
        if "/" in label or "\\" in label or label.startswith(".") or not label.strip():
            raise ValueError(
                f"vit study {path}: variant label {label!r} names a file in out: it may not be empty, contain "
                "'/' or '\\', or start with '.'"
            )
        fields = {**spec.get("base", {}), **{k: v for k, v in variant.items() if k != "label"}}
        for seed in spec.get("seeds", [0]):
            try:
                runs.append((label, seed, ViTConfig(**fields, seed=seed)))
            except ValidationError as err:
                raise ValueError(format_validation_error(err, f"vit study {path}", ViTConfig)) from None
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {}
    for label, seed, cfg in runs:
        file = out / f"{label.replace(' ', '_')}_seed{seed}.json"
        record = json.loads(file.read_text()) if file.exists() else None
        if record is None or record["config"] != cfg.model_dump():
            record = run_vit(cfg, progress=progress)
            file.write_text(json.dumps(record, indent=2))
        results.setdefault(label, []).append(record)
    grids = [str(g) for g in runs[0][2].test_grids]
    lines = [f"# {spec.get('name', 'vit study')}", "",
             f"Accuracy on generated shapes, trained at a {runs[0][2].train_grid} x {runs[0][2].train_grid} patch grid "
             f"(mean ± std over seeds {spec.get('seeds', [0])}).", "",
             "| encoding | " + " | ".join(f"grid {g}x{g}" for g in grids) + " |", "|---|" + "---|" * len(grids)]  # fmt: skip
    for label, records in results.items():
        cells = []
        for g in grids:
            values = [r["accuracy"][g] for r in records]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.fmean(values):.3f} ± {spread:.3f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return {"report": "\n".join(lines), "results": results}
