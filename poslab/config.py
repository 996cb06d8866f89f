"""The configuration of one lab run: task, encoding, lengths, model and training.

A run is identified by the hash of its canonical config (aliases resolved, defaults filled,
keys sorted), so the same experiment is never computed twice.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from poslab import pe as pe_lib
from poslab import tasks

__all__ = ["RunConfig", "parse_length_range", "load_toml", "ConfigError", "format_validation_error"]


ATTENTIONS = ("softmax", "kernelized_rpe")


class ConfigError(ValueError):
    """A bad configuration value; the message names the field, the value and what is allowed."""


def parse_length_range(text: str | list | tuple) -> tuple[int, int]:
    """``"1:20"`` (or ``[1, 20]``) -> ``(1, 20)``, inclusive."""
    if isinstance(text, (list, tuple)):
        if len(text) != 2:
            raise ValueError(f"a length range has two ends, got {list(text)}")
        return int(text[0]), int(text[1])
    parts = str(text).split(":")
    if len(parts) != 2 or not all(p.strip().lstrip("-").isdigit() for p in parts):
        raise ValueError(f"a length range is written LO:HI, e.g. 1:20; got {text!r}")
    return int(parts[0]), int(parts[1])


class RunConfig(BaseModel):
    """One training + evaluation run. Defaults are the tiny CPU configuration of tasks.md 1.7."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    task: str = Field("copy", description="task name, see `poslab tasks`")
    pe: pe_lib.EncodingName = Field("rope", description="encoding name, see `poslab list`")
    pe_params: dict[str, Any] = Field(default_factory=dict)
    train_length: tuple[int, int] = Field((1, 20), description="inclusive range of training lengths")
    test_length: tuple[int, int] = Field((1, 40), description="inclusive range of evaluated lengths")
    scratchpad: str | None = Field(None, description="scratchpad parts, e.g. i1_c1_o1_v1_r1 (tasks.md 2.13)")
    test_task: str | None = Field(
        None, description="evaluate on another task with the same vocabulary (e.g. flip_flop_sparse); None = task"
    )
    positions: str = Field("contiguous", description="position-id scheme, see poslab.positions")
    positions_params: dict[str, Any] = Field(default_factory=dict, description="id-scheme parameters")
    attention: str = Field("softmax", description="softmax, or kernelized_rpe (kernelized attention + Toeplitz RPE)")
    attention_params: dict[str, Any] = Field(default_factory=dict, description="kernelized attention parameters")
    window: int | None = Field(None, gt=0, description="sliding window W (causal: 0 <= i - j < W); None = full")
    sinks: int = Field(0, ge=0, description="first keys every query sees (attention sinks); needs a window")
    logit_scale: str = Field("none", description="per-query logit temperature (poslab.shaping.LOGIT_SCALES)")
    logit_scale_params: dict[str, Any] = Field(default_factory=dict, description="train_length, init")
    steps: int = Field(2000, gt=0)
    seed: int = Field(0, ge=0, description="model and batch-order seed")
    data_seed: int = Field(0, ge=0, description="seed of the generated splits")
    batch_size: int = Field(64, gt=0)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup: float = Field(0.06, ge=0, lt=1, description="fraction of steps with linear warm-up")
    grad_clip: float = Field(1.0, gt=0)
    d_model: int = Field(64, gt=0)
    num_layers: int = Field(2, gt=0)
    num_heads: int = Field(4, gt=0)
    d_ff: int | None = Field(None, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    train_examples: int = Field(20000, gt=0, description="size of the generated training set (train_data pool)")
    train_data: Literal["pool", "fresh"] = Field(
        "pool",
        description="pool: train_examples generated once, batches drawn from them; fresh: every step "
        "generates a new batch, all of one length drawn uniformly from train_length (the Chomsky "
        "suite's protocol)",
    )
    test_per_length: int = Field(50, gt=0, description="test examples per evaluated length")
    eval_batch_size: int = Field(256, gt=0)
    norm: Literal["layernorm", "rmsnorm"] = Field("layernorm", description="the model's normalization layers")
    init: Literal["gpt2", "t5"] = Field(
        "gpt2", description="gpt2; or t5: T5's initialization with unscaled q.k logits (poslab.model.TransformerConfig)"
    )
    threads: int | None = Field(
        None,
        gt=0,
        description="PyTorch intra-op threads of the run, pinned: results differ in the last bits between "
        "thread counts, so a pinned count enters the run id and reproduces bit for bit across `run` and `sweep`. "
        "None: the executor's choice (all cores for `poslab run`, cores / workers in a sweep), recorded in the "
        "run's env",
    )

    @field_validator("task")
    @classmethod
    def _task(cls, name: str) -> str:
        return tasks.canonical_task(name)

    @field_validator("test_task")
    @classmethod
    def _test_task(cls, name: str | None) -> str | None:
        return None if name is None else tasks.canonical_task(name)

    @field_validator("attention")
    @classmethod
    def _attention(cls, name: str) -> str:
        if name not in ATTENTIONS:
            raise ValueError(f"unknown attention {name!r}; valid: {', '.join(ATTENTIONS)}")
        return name

    @field_validator("train_length", "test_length", mode="before")
    @classmethod
    def _range(cls, value):
        return parse_length_range(value)

    @model_validator(mode="after")
    def _lengths(self) -> RunConfig:
        task = tasks.get_task(self.task)
        for field in ("train_length", "test_length"):
            lo, hi = getattr(self, field)
            if lo > hi:
                raise ValueError(f"{field}={lo}:{hi} is inverted; write LO:HI with LO <= HI")
            if lo < task.min_length:
                raise ValueError(f"{field}={lo}:{hi} starts below {task.min_length}, the shortest {self.task} example")
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}")
        if self.test_task is not None:
            other = tasks.get_task(self.test_task)
            if self.scratchpad is not None:
                raise ValueError(f"test_task={self.test_task!r} cannot be combined with a scratchpad")
            if other.vocabulary().itos != task.vocabulary().itos or getattr(other, "encoder", False) != getattr(
                task, "encoder", False
            ):
                raise ValueError(
                    f"test_task={self.test_task!r} must share task {self.task!r}'s vocabulary and model kind "
                    "(decoder or encoder)"
                )
        if self.scratchpad is not None:
            from poslab.tasks.scratchpad import check_supported

            check_supported(self.task, self.scratchpad)
        from poslab import positions

        if getattr(task, "encoder", False) and pe_lib.get(self.pe).causal_only:
            raise ValueError(
                f"task {self.task!r} needs a bidirectional encoder but pe={self.pe!r} is defined for "
                "causal attention only"
            )
        positions.check_scheme(self.positions, self.positions_params, task.vocabulary())
        # every evaluated length needs ids (a sequence has at least `length` tokens); the exact
        # token count is checked again once the data exists
        positions.check_cover(self.positions, self.positions_params, self.test_length[1])
        dims, reads = positions.position_dims(self.positions), pe_lib.get(self.pe).position_dims
        if dims > reads:
            two_d = ", ".join(n for n in pe_lib.names() if pe_lib.get(n).position_dims == dims)
            raise ValueError(
                f"positions={self.positions!r} gives {dims} ids per token but pe={self.pe!r} reads {reads}; "
                f"encodings that read them: {two_d}"
            )
        unknown = set(self.pe_params) - set(pe_lib.parameters(self.pe))
        if unknown:
            raise ValueError(
                f"pe_params {sorted(unknown)} are not parameters of {self.pe!r}; "
                f"valid: {', '.join(pe_lib.parameters(self.pe))}"
            )
        from poslab.model import transformer_config

        # the model this run trains, validated (the encoding checks its parameter values here,
        # before any work); only its table size waits for the data (transformer_config)
        vocab = task.vocabulary()
        if self.scratchpad is not None:
            from poslab.tasks.scratchpad import ScratchpadTask

            vocab = ScratchpadTask(task, self.scratchpad).vocabulary()
        transformer_config(
            self,
            vocab_size=len(vocab),
            causal=not getattr(task, "encoder", False),
            max_seq_len=positions.table_size(self.positions, self.positions_params, self.test_length[1]),
        )
        return self

    def transformer_config(self, vocab_size: int, max_seq_len: int):
        """The :class:`~poslab.model.TransformerConfig` of this run, sized for its data
        (``max_seq_len``: the longest token sequence under the id scheme). The same mapping
        validated the run's model when the run was created; it is computed again here, so a
        copy made with ``model_copy(update=...)`` (which validates nothing) gets its own."""
        from poslab.model import transformer_config

        causal = not getattr(tasks.get_task(self.task), "encoder", False)
        return transformer_config(self, vocab_size=vocab_size, causal=causal, max_seq_len=max_seq_len)

    # fields added after runs were stored: left out of the hash while at their default, so
    # earlier run ids stay valid
    _LATER_FIELDS = {
        "positions": "contiguous",
        "positions_params": {},
        "attention": "softmax",
        "attention_params": {},
        "test_task": None,
        "train_data": "pool",
        "window": None,
        "sinks": 0,
        "logit_scale": "none",
        "logit_scale_params": {},
        "threads": None,
        "norm": "layernorm",
        "init": "gpt2",
    }

    def canonical(self) -> dict[str, Any]:
        """Plain, sorted dict of every field (aliases resolved): what the run id hashes."""
        data = self.model_dump(mode="json")
        for key, default in self._LATER_FIELDS.items():
            if data.get(key) == default:
                del data[key]
        return json.loads(json.dumps(data, sort_keys=True))

    def run_id(self) -> str:
        """16 hex digits of SHA-256 over the canonical config."""
        blob = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @classmethod
    def create(cls, **fields: Any) -> RunConfig:
        """Validate ``fields``; raise :class:`ConfigError` with a readable message."""
        try:
            return cls(**fields)
        except ValidationError as err:
            raise ConfigError(format_validation_error(err, model=cls)) from None


def format_validation_error(
    err: ValidationError, what: str = "run config", model: type[BaseModel] | None = None
) -> str:
    """``invalid <what>:`` then one line per problem: ``field: message (got value)``. The one
    formatter of every config the command line validates (runs, sweeps, the LM lab, the ViT).
    With ``model``, an unknown field's line lists the fields ``model`` has."""
    lines = []
    for e in err.errors():
        where = ".".join(str(x) for x in e["loc"]) or "config"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field" + (f"; valid fields: {', '.join(model.model_fields)}" if model else "")
        value = e.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"{where}: {msg}{shown}")
    return f"invalid {what}:\n  " + "\n  ".join(lines)


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file into a dict (no validation). A missing, unreadable or malformed file
    raises :class:`ConfigError` naming the file and what is wrong (the line, for TOML)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{str(path)!r}: no such file" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{str(path)!r} is not valid TOML: {err}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{str(path)!r} cannot be read: {err}") from None
