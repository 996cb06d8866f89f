"""Position-id schemes: which index each token gets (the "ids" site).

A scheme maps a batch shape to ``(B, T)`` ids. Every encoding consumes whatever ids it is
given, so a scheme composes with any encoding. ``contiguous`` is the default. Schemes that
read the tokens (``abacus``, ``coupled``, ``bilevel``) are marked ``needs_tokens`` and get
the batch's ``tokens`` and the task's ``vocab``; their parameters name tokens as text
(``"+"``, ``"."``), resolved through the vocabulary.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from poslab.pe.base import check_int
from poslab.tasks.vocab import Vocabulary

__all__ = [
    "DEFAULT",
    "contiguous",
    "randomized",
    "abacus",
    "coupled",
    "bilevel",
    "register_scheme",
    "SchemeFacts",
    "facts",
    "scheme",
    "scheme_names",
    "scheme_parameters",
    "check_scheme",
    "table_size",
    "check_cover",
    "needs_tokens",
    "position_dims",
    "digit_runs",
]

IdScheme = Callable[..., Tensor]
DEFAULT = "contiguous"  # the scheme a model uses when it is given no ids
_SCHEMES: dict[str, IdScheme] = {}


@dataclass(frozen=True)
class SchemeFacts:
    """What the rest of poslab needs to know about an id scheme, declared where it is registered.

    Attributes:
        needs_tokens: the scheme reads the batch's tokens and the task's vocabulary.
        position_dims: ids per token: 1 (``(B, T)``) or 2 (``(B, T, 2)``).
        token_fields: parameters that name tokens (checked against the task's vocabulary).
        minimums: the smallest value each integer parameter may take.
        covers: the parameter (and its default) whose ids must reach the longest evaluated
            sequence, for schemes that spread ids over a range (``randomized``'s ``max_len``).
        table: ``(params, longest) -> positions`` a table-based encoding must hold under the
            scheme (default: ``longest``).
        check: ``params -> None``, raising ``ValueError`` on values no signature can express.
    """

    needs_tokens: bool = False
    position_dims: int = 1
    token_fields: tuple[str, ...] = ()
    minimums: dict[str, int] = field(default_factory=dict)
    covers: tuple[str, int] | None = None
    table: Callable[[dict[str, Any], int], int] | None = None
    check: Callable[[dict[str, Any]], None] | None = None


_FACTS: dict[str, SchemeFacts] = {}


def register_scheme(name: str, facts: SchemeFacts | None = None) -> Callable[[IdScheme], IdScheme]:
    """Function decorator: make an id scheme available by name, with its :class:`SchemeFacts`."""

    def deco(fn: IdScheme) -> IdScheme:
        _SCHEMES[name] = fn
        _FACTS[name] = facts or SchemeFacts()
        return fn

    return deco


def facts(name: str) -> SchemeFacts:
    """The :class:`SchemeFacts` of scheme ``name``; the error lists the valid schemes."""
    scheme(name)
    return _FACTS[name]


def scheme(name: str) -> IdScheme:
    """The id scheme registered as ``name``; the error lists the valid ones."""
    try:
        return _SCHEMES[name]
    except KeyError:
        raise ValueError(f"unknown id scheme {name!r}; valid schemes: {', '.join(scheme_names())}") from None


def scheme_names() -> list[str]:
    """Registered id-scheme names, sorted."""
    return sorted(_SCHEMES)


@register_scheme("contiguous")
def contiguous(
    batch_size: int,
    length: int,
    *,
    offset: int = 0,
    device: torch.device | str | None = None,
    training: bool = False,
    generator: torch.Generator | None = None,
    tokens: Tensor | None = None,
    vocab: Vocabulary | None = None,
) -> Tensor:
    """Ids ``offset, offset + 1, ..., offset + length - 1`` for every row: ``(B, T)`` int64.

    ``training``, ``generator``, ``tokens`` and ``vocab`` are accepted for a uniform scheme
    signature; unused.
    """
    if length < 0 or batch_size < 1:
        raise ValueError(f"contiguous ids need batch_size >= 1 and length >= 0, got {batch_size}, {length}")
    ids = torch.arange(offset, offset + length, device=device, dtype=torch.long)
    return ids.expand(batch_size, length)


RANDOMIZED_EVAL_MODES = ("arange", "random")


def _check_randomized(params: dict[str, Any]) -> None:
    if int(params.get("max_len", 2048)) < 1:
        raise ValueError(f"randomized: max_len must be >= 1, got {params['max_len']}")
    mode = params.get("eval_mode", "arange")
    if mode not in RANDOMIZED_EVAL_MODES:
        raise ValueError(f"randomized: eval_mode={mode!r} is not one of {', '.join(map(repr, RANDOMIZED_EVAL_MODES))}")


@register_scheme(
    "randomized",
    SchemeFacts(
        covers=("max_len", 2048),
        table=lambda params, longest: max(longest, int(params.get("max_len", 2048))),
        check=_check_randomized,
    ),
)
def randomized(
    batch_size: int,
    length: int,
    *,
    max_len: int = 2048,
    eval_mode: str = "arange",
    per_batch: bool = True,
    offset: int = 0,
    device: torch.device | str | None = None,
    training: bool = False,
    generator: torch.Generator | None = None,
    tokens: Tensor | None = None,
    vocab: Vocabulary | None = None,
) -> Tensor:
    """Randomized positions: a sorted random subset of ``{0, ..., max_len - 1}``.

    *Randomized Positional Encodings Boost Length Generalization of Transformers*, Ruoss,
    2023, arXiv 2305.16843. In training a sequence of length ``T <= max_len`` gets ``T``
    distinct ids drawn without replacement and sorted, so the model sees ids up to
    ``max_len`` while training only on short inputs. ``max_len`` must cover the longest
    evaluated length.

    Args:
        max_len: ``L``, the simulated range (the reference example uses 2048).
        eval_mode: ``"arange"`` (contiguous ids at evaluation) or ``"random"`` (sample at
            evaluation too, as the reference code does).
        per_batch: one draw shared by the batch (the reference code) or one per row.
        offset: added to every id (used for cached decoding with ``"arange"``).

    Returns:
        ``(1 or B, T)`` int64 ids.
    """
    if eval_mode not in RANDOMIZED_EVAL_MODES:
        raise ValueError(
            f"randomized: eval_mode={eval_mode!r} is not one of {', '.join(map(repr, RANDOMIZED_EVAL_MODES))}"
        )
    if length > max_len:
        raise ValueError(
            f"randomized: a sequence of length {length} needs max_len >= {length}, got max_len={max_len}; "
            "max_len must cover the longest evaluated length"
        )
    if not training and eval_mode == "arange":
        return contiguous(1 if per_batch else batch_size, length, offset=offset, device=device)
    rows = 1 if per_batch else batch_size
    scores = torch.rand(rows, max_len, generator=generator)
    ids = scores.topk(length, dim=-1).indices.sort(dim=-1).values  # T distinct, sorted
    return ids.to(device=device) + offset


@register_scheme(
    "pose",
    SchemeFacts(
        minimums={"target_length": 1, "chunks": 1},
        covers=("target_length", 2048),
        table=lambda params, longest: max(longest, int(params.get("target_length", 2048))),
    ),
)
def pose(
    batch_size: int,
    length: int,
    *,
    target_length: int = 2048,
    chunks: int = 2,
    per_batch: bool = True,
    offset: int = 0,
    device: torch.device | str | None = None,
    training: bool = False,
    generator: torch.Generator | None = None,
    tokens: Tensor | None = None,
    vocab: Vocabulary | None = None,
) -> Tensor:
    """PoSE ids: in training, ``chunks`` chunks of the sequence with non-decreasing skips, so
    the ids span up to ``target_length``; contiguous at evaluation.

    *PoSE: Efficient Context Window Extension of LLMs via Positional Skip-wise Training*, Zhu,
    2023, arXiv 2309.10400 (see :mod:`poslab.extend.pose`; here the content stays in place and
    only the ids skip).

    Returns:
        ``(1 or B, T)`` int64 ids.
    """
    from poslab.extend.pose import pose_ids

    if length > target_length:
        raise ValueError(
            f"pose: a sequence of length {length} needs target_length >= {length}, got target_length={target_length}"
        )
    if not training or length == 0:
        return contiguous(1 if per_batch else batch_size, length, offset=offset, device=device)
    rows = [
        pose_ids(length, target_length, chunks=chunks, generator=generator)
        for _ in range(1 if per_batch else batch_size)
    ]
    return torch.stack(rows).to(device=device) + offset


def _token_ids(scheme_name: str, field: str, values, vocab: Vocabulary | None) -> list[int]:
    """Token ids for ``values`` (token texts, or ids when there is no vocabulary)."""
    if isinstance(values, (str, int)):
        values = [values]
    out = []
    for v in values:
        if isinstance(v, str):
            if vocab is None:
                raise ValueError(f"{scheme_name}: {field} names token {v!r} but no vocabulary was given")
            if v not in vocab.stoi:
                raise ValueError(f"{scheme_name}: {field} token {v!r} is not in the task's vocabulary")
            out.append(vocab.stoi[v])
        else:
            out.append(int(v))
    return out


def needs_tokens(name: str) -> bool:
    """The scheme reads the batch's tokens (and the task's vocabulary)."""
    return facts(name).needs_tokens


def position_dims(name: str) -> int:
    """Ids per token the scheme gives: 1 (``(B, T)``) or 2 (``(B, T, 2)``)."""
    return facts(name).position_dims


def digit_runs(tokens: Tensor, digit_ids: list[int]) -> Tensor:
    """1-based index of each token inside its maximal run of digit tokens; 0 elsewhere."""
    is_digit = torch.isin(tokens, torch.tensor(digit_ids, device=tokens.device))
    count = is_digit.long().cumsum(-1)
    reset = torch.where(is_digit, torch.zeros_like(count), count).cummax(-1).values  # count at the last non-digit
    return (count - reset) * is_digit


@register_scheme(
    "abacus",
    SchemeFacts(
        needs_tokens=True,
        token_fields=("digits",),
        minimums={"max_offset": 0},
        # a digit run is shorter than the sequence; training adds up to K
        table=lambda params, longest: longest + int(params.get("max_offset", 100)) + 1,
    ),
)
def abacus(
    batch_size: int,
    length: int,
    *,
    max_offset: int = 100,
    digits: tuple = tuple("0123456789"),
    offset: int = 0,
    device: torch.device | str | None = None,
    training: bool = False,
    generator: torch.Generator | None = None,
    tokens: Tensor | None = None,
    vocab: Vocabulary | None = None,
) -> Tensor:
    """Abacus ids: each digit's 1-based index inside its run of consecutive digits; 0 elsewhere.

    *Transformers Can Do Arithmetic with the Right Embeddings*, McLeish, 2024, arXiv
    2405.17399. With numbers written least significant digit first (``add_revall``) the
    index is the digit's significance + 1 in every number. In training one offset
    ``k ~ U{0..max_offset}`` per batch (the reference code) is added to every non-zero id;
    evaluation uses ``k = 0``. Feed the ids to ``learned`` for the paper's Abacus + NoPE.

    Args:
        max_offset: ``K`` (100 in the published configuration).
        digits: the 10 digit tokens (texts, or ids without a vocabulary).

    Returns:
        ``(B, T)`` int64 ids.
    """
    if tokens is None:
        raise ValueError("abacus ids are computed from the tokens; none were given")
    if max_offset < 0:
        raise ValueError(f"abacus: max_offset must be >= 0, got {max_offset}")
    ids = digit_runs(tokens, _token_ids("abacus", "digits", digits, vocab))
    if training and max_offset > 0:
        k = int(torch.randint(0, max_offset + 1, (1,), generator=generator))
        ids = torch.where(ids > 0, ids + k, ids)
    return ids.to(device=device)


@register_scheme(
    "coupled",
    SchemeFacts(
        needs_tokens=True,
        token_fields=("digits", "operators", "equals"),
        minimums={"max_pos": 3},
        table=lambda params, longest: max(longest, int(params.get("max_pos", 202)) + 1),
    ),
)
def coupled(
    batch_size: int,
    length: int,
    *,
    max_pos: int = 202,
    operators: tuple = ("+",),
    equals: str | int = "=",
    digits: tuple = tuple("0123456789"),
    reversed_answer: bool = True,
    offset: int = 0,
    device: torch.device | str | None = None,
    training: bool = False,
    generator: torch.Generator | None = None,
    tokens: Tensor | None = None,
    vocab: Vocabulary | None = None,
) -> Tensor:
    """Position coupling for addition: digits of equal significance share one id.

    *Position Coupling: Improving Length Generalization of Arithmetic Transformers Using
    Task Structure*, Cho (Hanseul), 2024, arXiv 2405.20671. For ``a + b = c`` with ``n``
    the longer operand's digits and start ``s``, ``e = s + n + 1``: a digit of significance
    ``k`` (in ``a``, ``b`` or the answer) gets ``e - 1 - k``, the operator and ``=`` get
    ``e``, every other token (``<bos>``, ``<eos>``, padding) 0. Training draws
    ``s ~ U{1..max_pos - n - 1}`` per example; evaluation uses ``s = 1``. This follows the
    reference code (``AdditionDatasetWithCoupledPositions``), where ids decrease with
    significance (tasks.md 4.2 states the opposite direction; only the equalities matter).

    Args:
        max_pos: ``P``, the largest id (202 in the published run script); a learned table
            needs ``P + 1`` rows.
        operators, equals, digits: the tokens of the format (texts, or ids without a vocabulary).
        reversed_answer: the answer is written least significant digit first.

    Returns:
        ``(B, T)`` int64 ids.
    """
    if tokens is None:
        raise ValueError("coupled ids are computed from the tokens; none were given")
    digit_set = set(_token_ids("coupled", "digits", digits, vocab))
    op_set = set(_token_ids("coupled", "operators", operators, vocab))
    (eq,) = _token_ids("coupled", "equals", [equals], vocab)
    rows = tokens.tolist()
    out = torch.zeros(len(rows), len(rows[0]) if rows else 0, dtype=torch.long)
    for r, row in enumerate(rows):
        op = next((i for i, t in enumerate(row) if t in op_set), None)
        if op is None:
            continue  # not an arithmetic row: all ids 0
        eq_at = next((i for i in range(op + 1, len(row)) if row[i] == eq), len(row))
        a = [i for i in range(op) if row[i] in digit_set]
        b = [i for i in range(op + 1, eq_at) if row[i] in digit_set]
        ans = []
        for i in range(eq_at + 1, len(row)):
            if row[i] not in digit_set:
                break
            ans.append(i)
        n = max(len(a), len(b), 1)
        if max_pos - n - 1 < 1:
            raise ValueError(f"coupled: max_pos={max_pos} is too small for {n}-digit operands (needs >= {n + 2})")
        s = 1
        if training:
            s = int(torch.randint(1, max_pos - n, (1,), generator=generator))
        end = s + n + 1
        for number in (a, b):
            for p, i in enumerate(number):
                out[r, i] = end - 1 - (len(number) - 1 - p)
        out[r, op] = end
        if eq_at < len(row):
            out[r, eq_at] = end
        for p, i in enumerate(ans):
            k = p if reversed_answer else len(ans) - 1 - p
            out[r, i] = end - 1 - k
    return out.to(device=device)


@register_scheme(
    "bilevel",
    SchemeFacts(needs_tokens=True, position_dims=2, token_fields=("separators",), minimums={"max_intra": 1}),
)
def bilevel(
    batch_size: int,
    length: int,
    *,
    separators: tuple = (".",),
    max_intra: int = 1024,
    offset: int = 0,
    device: torch.device | str | None = None,
    training: bool = False,
    generator: torch.Generator | None = None,
    tokens: Tensor | None = None,
    vocab: Vocabulary | None = None,
) -> Tensor:
    """BiPE bilevel ids ``(B, T, 2)``: ``[intra, seg]``.

    *Two Stones Hit One Bird: Bilevel Positional Encoding for Better Length Extrapolation*,
    He (Zhenyu), 2024, arXiv 2401.16421. ``seg_t`` counts the separators strictly before
    ``t`` (a separator closes its segment); ``intra_t`` is ``t``'s offset from its segment's
    first token, clamped to ``max_intra - 1``. Use with ``bipe_rope`` or ``bipe_alibi``.

    Args:
        separators: tokens that end a segment (texts, or ids without a vocabulary).
        max_intra: ``L_intra`` (1024 in the reference).

    Returns:
        ``(B, T, 2)`` int64 ids.
    """
    if tokens is None:
        raise ValueError("bilevel ids are computed from the tokens; none were given")
    sep = torch.isin(tokens, torch.tensor(_token_ids("bilevel", "separators", separators, vocab), device=tokens.device))
    seg = torch.cumsum(sep.long(), -1) - sep.long()  # separators strictly before t
    t = torch.arange(tokens.shape[-1], device=tokens.device).expand_as(tokens)
    last_sep = torch.where(sep, t, torch.full_like(t, -1)).cummax(-1).values
    before = torch.cat((torch.full_like(t[..., :1], -1), last_sep[..., :-1]), -1)  # strictly before t
    intra = (t - before - 1).clamp(max=max_intra - 1)
    return torch.stack((intra, seg), -1).to(device=device)


def scheme_parameters(name: str) -> list[str]:
    """Keyword parameters a user may set for scheme ``name``."""
    fixed = {"batch_size", "length", "offset", "device", "training", "generator", "tokens", "vocab"}
    sig = inspect.signature(scheme(name))
    return [k for k, p in sig.parameters.items() if p.kind == p.KEYWORD_ONLY and k not in fixed]


def check_scheme(name: str, params: dict[str, Any], vocab: Vocabulary | None = None) -> None:
    """Raise ``ValueError`` naming the scheme, the bad parameter and the valid ones.

    With the task's ``vocab``, token parameters (``separators``, ``digits``, ...) must name
    tokens of that vocabulary."""
    scheme(name)  # unknown name -> lists the valid ones
    valid = scheme_parameters(name)
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {', '.join(unknown)} for id scheme {name!r}; valid: {', '.join(valid) or '(none)'}"
        )
    scheme_facts = facts(name)
    for param, low in scheme_facts.minimums.items():
        if param in params:
            check_int(name, param, params[param], low)
    if vocab is not None:
        for param in scheme_facts.token_fields:
            default = inspect.signature(scheme(name)).parameters[param].default
            _token_ids(name, param, params.get(param, default), vocab)
    if scheme_facts.check is not None:
        scheme_facts.check(params)


def table_size(name: str, params: dict[str, Any], longest: int) -> int:
    """Positions a table-based encoding must hold under scheme ``name``."""
    table = facts(name).table
    return longest if table is None else table(params, longest)


def check_cover(name: str, params: dict[str, Any], longest: int) -> None:
    """Raise ``ValueError`` when a scheme that spreads ids over a range cannot reach ``longest``."""
    covers = facts(name).covers
    if covers is None:
        return
    param, default = covers
    cover = int(params.get(param, default))
    if cover < longest:
        raise ValueError(
            f"positions_params.{param}={cover} is shorter than the longest sequence of this run "
            f"({longest} tokens); {name} ids must cover every evaluated length"
        )
