"""The language-modelling lab: pretrain a byte-level RoPE model at ``L``, stretch it, measure it.

- :func:`pretrain`: a decoder on random ``L``-byte windows of the corpus' train split.
- :func:`finetune`: the same weights, a context-extension method at a target length ``T``,
  a short run on ``T``-byte windows, or on ``L``-byte windows with PoSE ids spread over ``T``.
- :func:`perplexity`: perplexity of the test split at one context length, with the
  non-overlapping protocol (chunks of ``c`` bytes, every byte scored with the context before
  it in its chunk) or the sliding-window protocol (windows of ``c`` bytes every ``stride``
  bytes, each scoring only its last ``stride`` bytes, so every scored byte sees at least
  ``c - stride`` bytes of context). Both score the same span of the test split at every
  ``c``, so the numbers differ only by context.
- :func:`load_model`: a pretrained (or fine-tuned) model under any method of
  :mod:`poslab.lm.methods`, training-free.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors.torch import load_file, save_file
from torch.nn import functional as F

from poslab import pe as pe_lib
from poslab.lm.corpus import VOCAB_SIZE, Corpus, load_corpus
from poslab.lm.methods import METHODS, method_encoding
from poslab.loop import StepLoss, make_optimizer, shift_ids, train_loop
from poslab.model import Transformer, transformer_config

__all__ = [
    "LMConfig",
    "pretrain",
    "finetune",
    "perplexity",
    "load_model",
    "read_record",
    "search_longrope",
    "PROTOCOLS",
]

PROTOCOLS = ("nonoverlapping", "sliding")


class LMConfig(BaseModel):
    """A byte-level language model and its pretraining run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    corpus: str | None = Field(None, description="directory of text files; None = the standard library's source")
    max_bytes: int = Field(4_000_000, ge=1024, description="corpus size cap")
    train_length: int = Field(128, ge=8, description="L, the pretraining context")
    d_model: int = Field(128, gt=0)
    num_layers: int = Field(4, gt=0)
    num_heads: int = Field(4, gt=0)
    rope_base: float = Field(10000.0, gt=1.0)
    pe: pe_lib.EncodingName = Field(
        "rope", description="the encoding pretrained with; context-extension methods need rope"
    )
    pe_params: dict[str, Any] = Field(default_factory=dict, description="its parameters")
    max_position: int | None = Field(
        None, ge=8, description="the longest context a non-RoPE model represents (learned tables, SeqPE); default 8 L"
    )
    steps: int = Field(2000, gt=0)
    batch_size: int = Field(32, gt=0)
    lr: float = Field(1e-3, gt=0)
    warmup: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.05, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _rope_params(self) -> LMConfig:
        if pe_lib.get(self.pe).scalable and self.pe_params:
            raise ValueError(
                f"pe_params={self.pe_params!r}: a RoPE model takes only rope_base here (context-extension methods "
                "set the rest at evaluation)"
            )
        return self

    @property
    def positions(self) -> int:
        """The longest context of a non-RoPE model (``max_position``, default ``8 L``)."""
        return self.max_position or 8 * self.train_length

    @property
    def rope(self) -> bool:
        """The model is pretrained with a RoPE that context-extension methods rescale."""
        return pe_lib.get(self.pe).scalable

    def encoding(self) -> tuple[str, dict[str, Any]]:
        """``(pe, pe_params)`` of pretraining: RoPE gets ``rope_base``; an encoding that is
        sized for its positions (SeqPE) gets ``max_position``."""
        if self.rope:
            return self.pe, {"base": self.rope_base, **self.pe_params}
        return self.pe, {**pe_lib.get(self.pe).sized_for(max_position=self.positions), **self.pe_params}


def _model(cfg: LMConfig, pe: str, pe_params: dict, max_seq_len: int) -> Transformer:
    return Transformer(transformer_config(cfg, vocab_size=VOCAB_SIZE, pe=pe, pe_params=pe_params,
                                          max_seq_len=max_seq_len))  # fmt: skip


def _windows(data: torch.Tensor, length: int, batch: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, data.numel() - length - 1, (batch,), generator=gen)
    return torch.stack([data[s : s + length + 1] for s in starts.tolist()])


def _train_loop(model, data, cfg: LMConfig, steps: int, lr: float, length: int, make_ids, progress: bool, desc: str):
    opt, sched = make_optimizer(model, lr, cfg.weight_decay, steps, cfg.warmup)
    gen = torch.Generator().manual_seed(cfg.seed)

    def step_loss(step: int) -> StepLoss:
        window = _windows(data, length, cfg.batch_size, gen)
        inputs, ids = make_ids(window, gen)
        ids, span, shifted = shift_ids(model.pe, ids, length, gen)  # an encoding's own shift (SeqPE)
        logits = model(inputs[:, :-1], position_ids=ids)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), inputs[:, 1:].reshape(-1))
        return StepLoss(loss, span, shifted)

    return train_loop(model, model.pe, step_loss, opt=opt, sched=sched, steps=steps, generator=gen,
                      grad_clip=cfg.grad_clip, progress=progress, desc=desc, advice="lower the lr")  # fmt: skip


def _save(model: Transformer, out: Path, record: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    # the encoding's parameters are kept (learned tables, SeqPE); its buffers are not (RoPE's
    # tables are rebuilt by each context-extension method)
    kept = {f"pe.{name}" for name, _ in model.pe.named_parameters()}
    state = {
        k: v.contiguous()
        for k, v in model.state_dict().items()
        if k != "head.weight" and (not k.startswith("pe.") or k in kept)
    }
    save_file(state, out / "model.tmp")
    (out / "model.tmp").replace(out / "model.safetensors")
    (out / "record.json").write_text(json.dumps(record, indent=2))


def pretrain(cfg: LMConfig, out: str | Path, *, corpus: Corpus | None = None, progress: bool = True) -> dict:
    """Pretrain at ``cfg.train_length`` with ``cfg.pe`` (plain RoPE by default); writes ``model.safetensors`` and
    ``record.json`` (config, corpus digest, loss curve) to ``out``; returns the record."""
    from poslab.runner import loss_curve

    corpus = corpus or load_corpus(cfg.corpus, max_bytes=cfg.max_bytes)
    torch.manual_seed(cfg.seed)
    pe, params = cfg.encoding()
    model = _model(cfg, pe, params, cfg.train_length if cfg.rope else cfg.positions)
    t0 = time.perf_counter()
    losses = _train_loop(
        model, corpus.train, cfg, cfg.steps, cfg.lr, cfg.train_length, lambda w, g: (w, None), progress, "pretrain"
    )
    record = {
        "config": cfg.model_dump(),
        "corpus": {"source": corpus.source, "files": corpus.files, "sha256": corpus.digest,
                   "bytes": {k: corpus.split(k).numel() for k in ("train", "val", "test")}},
        "method": "none",
        "train": {"steps": cfg.steps, "seconds": round(time.perf_counter() - t0, 1), "loss_curve": loss_curve(losses),
                  "final_loss": sum(losses[-50:]) / len(losses[-50:])},
    }  # fmt: skip
    _save(model, Path(out), record)
    return record


def read_record(path: str | Path) -> dict:
    """The ``record.json`` of a saved model (config, corpus, method, training)."""
    path = Path(path)
    if not (path / "model.safetensors").exists() or not (path / "record.json").exists():
        raise ValueError(f"no model at {str(path)!r} (expected model.safetensors and record.json from `poslab lm`)")
    try:
        record = json.loads((path / "record.json").read_text())
        LMConfig(**record["config"])
    except (OSError, ValueError, KeyError, TypeError) as err:  # a cut-short or hand-edited record
        raise ValueError(
            f"the model at {str(path)!r} has an unreadable record.json ({type(err).__name__}: {err})"
        ) from None
    return record


def load_model(path: str | Path, method: str = "none", target_length: int | None = None) -> tuple[Transformer, dict]:
    """A saved model under ``method`` for contexts up to ``target_length`` (training-free).

    A fine-tuned model keeps the method it was fine-tuned with; ``method`` must then be it."""
    path = Path(path)
    record = read_record(path)
    cfg = LMConfig(**record["config"])
    tuned = record.get("method", "none")
    if tuned != "none" and method != tuned:
        raise ValueError(f"the model at {str(path)!r} was fine-tuned with {tuned!r}; evaluate it with that method")
    if not cfg.rope:
        if method != "none":
            raise ValueError(
                f"context-extension method {method!r} needs a RoPE model; the model at {str(path)!r} was pretrained "
                f"with pe={cfg.pe!r} (use method 'none')"
            )
        if target_length is not None and target_length > cfg.positions:
            raise ValueError(
                f"target_length={target_length} is past the {cfg.positions} positions the model at {str(path)!r} "
                f"represents (its max_position)"
            )
        pe, params = cfg.encoding()
        return _load_weights(_model(cfg, pe, params, cfg.positions), path), record
    target = max(target_length or cfg.train_length, cfg.train_length)
    if tuned != "none":
        target = record["finetune"]["target_length"]
    factors, n_hat = None, 0
    if method == "longrope":
        found = path / f"longrope_{target}.json"
        if found.exists():
            searched = json.loads(found.read_text())
            factors, n_hat = searched["long_factor"], searched.get("n_hat", 0)
    pe, params = method_encoding(method, cfg.train_length, target, cfg.rope_base, factors, n_hat)
    model = _model(cfg, pe, params, max(target, target_length or 0, cfg.train_length) * 2)
    return _load_weights(model, path), record


def _load_weights(model: Transformer, path: Path) -> Transformer:
    params = {f"pe.{name}" for name, _ in model.pe.named_parameters()}
    try:
        weights = load_file(path / "model.safetensors")
    except Exception as err:  # safetensors raises its own error type on a cut-short file
        raise ValueError(f"the weights at {str(path)!r} cannot be read ({type(err).__name__}: {err})") from None
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as err:  # shapes that do not fit
        raise ValueError(f"the weights at {str(path)!r} do not fit this model: {str(err).splitlines()[0]}") from None
    missing = [k for k in missing if k in params or not (k.startswith("pe.") or k == "head.weight")]
    if unexpected or missing:
        raise ValueError(
            f"the weights at {str(path)!r} do not fit this model: missing {missing}, unexpected {unexpected}"
        )
    return model.eval()


def finetune(
    path: str | Path,
    out: str | Path,
    *,
    method: str,
    target_length: int,
    steps: int = 200,
    lr: float = 2e-4,
    pose: bool = False,
    batch_size: int | None = None,
    corpus: Corpus | None = None,
    progress: bool = True,
) -> dict:
    """Fine-tune a pretrained model with ``method`` at ``target_length``: ``T``-byte windows,
    or with ``pose`` the pretraining length's windows with PoSE ids spread over ``T``.

    ``batch_size`` defaults to as many bytes per step as pretraining had."""
    from poslab.extend.pose import pose_ids
    from poslab.runner import loss_curve

    if method not in METHODS:
        raise ValueError(f"unknown context-extension method {method!r}; valid: {', '.join(METHODS)}")
    model, record = load_model(path, method, target_length)
    if record.get("method", "none") != "none":
        raise ValueError(f"the model at {str(path)!r} is already fine-tuned; start from a pretrained one")
    cfg = LMConfig(**record["config"])
    corpus = corpus or load_corpus(cfg.corpus, max_bytes=cfg.max_bytes)
    window = cfg.train_length if pose else target_length
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size={batch_size!r} must be an integer >= 1")
    batch = batch_size or max(1, cfg.batch_size * cfg.train_length // window)
    run_cfg = cfg.model_copy(update={"batch_size": batch})
    if pose:
        length = cfg.train_length

        def make_ids(window, gen):
            return window, pose_ids(length, target_length, generator=gen)[None]
    else:
        length = target_length

        def make_ids(window, gen):
            return window, None

    t0 = time.perf_counter()
    losses = _train_loop(model, corpus.train, run_cfg, steps, lr, length, make_ids, progress, f"finetune {method}")
    new = {
        **record,
        "method": method,
        "finetune": {"from": str(path), "method": method, "target_length": target_length, "steps": steps, "lr": lr,
                     "pose": pose, "batch_size": batch, "seconds": round(time.perf_counter() - t0, 1),
                     "loss_curve": loss_curve(losses)},
    }  # fmt: skip
    _save(model, Path(out), new)
    return new


@torch.no_grad()
def perplexity(
    model: Transformer,
    data: torch.Tensor,
    context: int,
    *,
    span: int,
    protocol: str = "nonoverlapping",
    stride: int | None = None,
    batch_size: int = 8,
) -> dict[str, float]:
    """Perplexity of the first ``span + 1`` bytes of ``data`` at context length ``context``.

    Returns ``{"perplexity", "nll", "bits_per_byte", "tokens"}``."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol={protocol!r} is not one of {', '.join(map(repr, PROTOCOLS))}")
    if context < 2 or span < context:
        raise ValueError(f"context={context} must be >= 2 and span={span} at least the context")
    if data.numel() < span + 1:
        raise ValueError(f"the test split has {data.numel()} bytes; span={span} needs {span + 1}")
    text = data[: span + 1]
    if protocol == "nonoverlapping":
        starts = list(range(0, span - context + 1, context))
        scored_from = [0] * len(starts)  # every position of a chunk is scored
    else:
        stride = stride or max(1, context // 2)
        if not 1 <= stride <= context:
            raise ValueError(f"stride={stride} must lie in 1..context={context}")
        starts = list(range(0, span - context + 1, stride))
        scored_from = [0] + [context - stride] * (len(starts) - 1)
    total, count = 0.0, 0
    for i in range(0, len(starts), batch_size):
        block = starts[i : i + batch_size]
        windows = torch.stack([text[s : s + context + 1] for s in block])
        logits = model(windows[:, :-1])
        nll = F.cross_entropy(logits.reshape(-1, VOCAB_SIZE).float(), windows[:, 1:].reshape(-1), reduction="none")
        nll = nll.view(len(block), context)
        for row, first in zip(nll, scored_from[i : i + batch_size]):
            total += float(row[first:].sum())
            count += context - first
    mean = total / count
    return {"perplexity": math.exp(mean), "nll": mean, "bits_per_byte": mean / math.log(2), "tokens": count}


def search_longrope(
    path: str | Path,
    target_length: int,
    *,
    population: int = 16,
    iterations: int = 8,
    mutations: int = 8,
    crossovers: int = 8,
    parents: int = 8,
    span: int | None = None,
    n_hat_choices: tuple[int, ...] | None = None,
    seed: int = 0,
    corpus: Corpus | None = None,
    progress: bool = True,
) -> dict:
    """LongRoPE's search (:mod:`poslab.extend.longrope_search`) for a pretrained model: the
    fitness is perplexity on the validation split at ``target_length``; ``n_hat`` (the leading
    positions that keep the original frequencies) is searched over the paper's choices below
    the training length. Writes ``longrope_<target>.json``."""
    from poslab.extend.longrope_search import N_HAT_CHOICES, search

    path = Path(path)
    record = read_record(path)
    if record.get("method", "none") != "none":
        raise ValueError(f"the model at {str(path)!r} is fine-tuned; search on a pretrained one")
    cfg = LMConfig(**record["config"])
    if not cfg.rope:
        raise ValueError(
            f"LongRoPE searches RoPE factors; the model at {str(path)!r} was pretrained with pe={cfg.pe!r}"
        )
    if target_length <= cfg.train_length:
        raise ValueError(f"target_length={target_length} must exceed the training length {cfg.train_length}")
    corpus = corpus or load_corpus(cfg.corpus, max_bytes=cfg.max_bytes)
    span = span or min(4 * target_length, corpus.val.numel() - 1)
    model, _ = load_model(path, "none", target_length)
    head_dim = cfg.d_model // cfg.num_heads
    scale = target_length / cfg.train_length
    if n_hat_choices is None:
        n_hat_choices = tuple(n for n in N_HAT_CHOICES if n < cfg.train_length)

    def fitness(candidate) -> float:
        from poslab.extend.longrope_search import scaling_dict

        model.pe.set_scaling(scaling_dict(candidate, cfg.train_length, scale), target_length, n_hat=candidate.n_hat)
        return perplexity(model, corpus.val, target_length, span=span)["perplexity"]

    result = search(
        fitness, head_dim=head_dim, base=cfg.rope_base, train_length=cfg.train_length, scale=scale,
        population=population, iterations=iterations, mutations=mutations, crossovers=crossovers,
        parents=parents, n_hat_choices=n_hat_choices, seed=seed, progress=progress,
    )  # fmt: skip
    out = {"target_length": target_length, "long_factor": list(result.best.factors), "n_hat": result.best.n_hat,
           "fitness": result.fitness,
           "history": result.history, "evaluated": result.evaluated, "seed": seed, "span": span}  # fmt: skip
    (path / f"longrope_{target_length}.json").write_text(json.dumps(out, indent=2))
    return out
