"""Every example study in ``examples/`` is valid: it parses and every run config it names
passes validation, so a typo in a study fails here, not an hour into a sweep."""

import tomllib
from pathlib import Path

import pytest

from poslab.lm.study import load_study
from poslab.sweep import expand, load_sweep
from poslab.vision import ViTConfig

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.toml"))


def _kind(spec: dict) -> str:
    if "methods" in spec:
        return "lm"
    if "variant" in spec and "out" in spec:
        return "vit"
    return "sweep"


def test_there_are_examples():
    assert len(EXAMPLES) >= 5


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_study_is_valid(path):
    spec = tomllib.loads(path.read_text())
    kind = _kind(spec)
    if kind == "sweep":
        configs = expand(load_sweep(path))
        assert configs and len({c.run_id() for c in configs}) == len(configs)
    elif kind == "lm":
        assert load_study(path).name == spec["name"]
    else:
        for variant in spec["variant"]:
            fields = {**spec.get("base", {}), **{k: v for k, v in variant.items() if k != "label"}}
            ViTConfig(**fields, seed=0)


def test_studies_add_the_sinusoidal_table_at_the_tokens_scale():
    """The rule the README's copy/reverse tables rest on: amplitude 0.02 sqrt(2) (RMS 0.02)."""
    for name in ("quickstart", "copy_reverse"):
        configs = expand(load_sweep(next(p for p in EXAMPLES if p.stem == name)))
        sinusoidal = [c for c in configs if c.pe == "sinusoidal"]
        assert sinusoidal and all(
            c.pe_params == {"amplitude": pytest.approx(0.02 * 2**0.5, rel=1e-5)} for c in sinusoidal
        )
