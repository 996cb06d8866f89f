import json

import pytest
import torch

from poslab.cli import main
from poslab.vision import (
    SHAPES,
    VisionTransformer,
    ViTConfig,
    grid_ids,
    patchify,
    render_shapes,
    run_vit,
    run_vit_study,
)


def test_rendered_shapes_are_labelled_and_resolution_independent():
    images, labels = render_shapes(64, 16, torch.Generator().manual_seed(0), noise=0.0)
    assert images.shape == (64, 16, 16) and set(labels.tolist()) <= set(range(len(SHAPES)))
    big, big_labels = render_shapes(64, 32, torch.Generator().manual_seed(0), noise=0.0)
    assert torch.equal(labels, big_labels)  # the same shapes, drawn at twice the resolution
    down = big.view(64, 16, 2, 16, 2).mean((2, 4))
    assert ((down - images).abs() > 0.5).float().mean() < 0.05  # agrees with the small drawing but for edges
    rings = images[labels == 1]
    squares = images[labels == 0]
    assert squares.sum((1, 2)).mean() > rings.sum((1, 2)).mean() * 0.5 > 0


def test_patches_and_grid_ids():
    images = torch.arange(2 * 8 * 8, dtype=torch.float32).view(2, 8, 8)
    patches = patchify(images, 4)
    assert patches.shape == (2, 4, 16)
    assert patches[0, 1].tolist() == images[0, :4, 4:].flatten().tolist()  # row-major patch order
    assert grid_ids(2, True, 8).tolist() == [[[0, 0], [0, 1], [1, 0], [1, 1]]]
    assert grid_ids(2, False, 8).tolist() == [[0, 1, 8, 9]]  # one stride at every grid size
    with pytest.raises(ValueError, match="not a multiple of patch=3"):
        patchify(images, 3)


@pytest.mark.parametrize("pe,params", [("rope_2d", {}), ("learned", {}), ("seqpe", {"apply": "input_add"})])
def test_a_vit_runs_on_every_grid_with_two_d_or_flattened_ids(pe, params):
    cfg = ViTConfig(pe=pe, pe_params=params, steps=3, test_examples=8, test_grids=[4, 6], d_model=16, num_layers=1)
    model = VisionTransformer(cfg)
    assert model.two_d == (pe != "learned")
    record = run_vit(cfg, progress=False)
    assert set(record["accuracy"]) == {"4", "6"} and all(0 <= a <= 1 for a in record["accuracy"].values())


def test_seqpe_in_the_vit_has_room_past_the_test_grids_and_shifts_its_training_grid():
    cfg = ViTConfig(pe="seqpe", pe_params={"shift_rate": 1.0}, train_grid=4, test_grids=[4, 6], d_model=16,
                    num_layers=1)  # fmt: skip
    model = VisionTransformer(cfg)
    assert model.body.pe.max_position == 16 and model.body.pe.dims == 2  # 4 x the training grid
    gen = torch.Generator().manual_seed(0)
    starts = set()
    for _ in range(50):
        ids, span, shifted = model.training_ids(4, gen)
        assert shifted and span == (4, 4) and ids.shape == (1, 16, 2)
        corner = tuple(ids[0, 0].tolist())
        assert torch.equal(ids - torch.tensor(corner), grid_ids(4, True, 6))  # the whole grid moved
        assert 0 <= min(corner) and max(corner) <= 12
        starts.add(corner)
    assert len(starts) > 10
    plain = VisionTransformer(cfg.model_copy(update={"pe_params": {"shift_rate": 0.0}}))
    assert not plain.training_ids(4, gen)[2]


def test_training_learns_the_shapes_at_the_training_grid():
    record = run_vit(ViTConfig(pe="rope_2d", steps=300, test_examples=200, test_grids=[4], d_model=32, num_layers=2),
                     progress=False)  # fmt: skip
    assert record["accuracy"]["4"] > 0.6  # four classes: chance is 0.25


def test_study_and_command_line(tmp_path, capsys):
    study = tmp_path / "s.toml"
    study.write_text(
        f'name = "t"\nout = "{tmp_path / "out"}"\nseeds = [0, 1]\n[base]\nsteps = 2\ntest_examples = 4\n'
        'test_grids = [4, 5]\nd_model = 16\nnum_layers = 1\n[[variant]]\nlabel = "rope 2d"\npe = "rope_2d"\n'
    )
    assert main(["vit", "--study", str(study), "--no-progress"]) == 0
    assert "| rope 2d |" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "rope_2d_seed1.json").read_text())["config"]["seed"] == 1
    assert main(["vit", "--pe", "rope_2d", "--steps", "1", "--test-grids", "4", "--no-progress"]) == 0
    assert main(["vit", "--pe", "bogus", "--no-progress"]) == 2
    assert "unknown encoding 'bogus'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="needs out"):
        (tmp_path / "bad.toml").write_text("name = 'x'\n")
        run_vit_study(tmp_path / "bad.toml")
