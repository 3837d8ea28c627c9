"""Losses: a hand-calculated hierarchical focal loss, focal(0) == CE, class weights, errors naming the line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from probes.tuning.losses import (
    HierarchyError,
    class_weights,
    focal_loss,
    load_hierarchy,
    make_loss,
    parse_hierarchy,
)

THREE = """\
lineages:
  ab: [A, B]
  c: [C]
penalties:
  - {true: A, pred: C, weight: 2}
smoothing: 0.2
gamma: 2
penalty_scale: 0.5
"""


def test_hierarchical_focal_equals_hand_calculation(tmp_path):
    path = tmp_path / "lineage.yaml"
    path.write_text(THREE)
    loss = make_loss("hierarchical-focal", ["A", "B", "C"], hierarchy=path)
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    y = torch.tensor([0, 2])
    # cell 1 (true A): p = softmax(2, 1, 0) = (0.665241, 0.244728, 0.090031); q = (0.8, 0.2, 0): A's lineage is {A, B}
    #   focal   = 0.8 * (1 - 0.665241)^2 * -ln 0.665241 + 0.2 * (1 - 0.244728)^2 * -ln 0.244728
    #           = 0.8 * 0.112064 * 0.407606 + 0.2 * 0.570436 * 1.407606 = 0.036542 + 0.160590 = 0.197132
    #   penalty = penalty_scale * P[A, C] * p_C = 0.5 * 2 * 0.090031 = 0.090031           -> 0.287163
    # cell 2 (true C, alone in its lineage): q = (0, 0, 1), p = 1/3 each, no penalty
    #   focal   = (2/3)^2 * ln 3 = 0.444444 * 1.098612 = 0.488272
    # mean = (0.287163 + 0.488272) / 2 = 0.387717
    assert loss(logits, y).item() == pytest.approx(0.387717, abs=2e-6)
    # the penalty only bites on the declared confusion: swap to true B, nothing declared for B
    no_pen = loss(logits[:1], torch.tensor([1])).item()
    p = torch.softmax(logits[0], 0)
    hand = 0.2 * (1 - p[0]) ** 2 * -torch.log(p[0]) + 0.8 * (1 - p[1]) ** 2 * -torch.log(p[1])
    assert no_pen == pytest.approx(hand.item(), rel=1e-6)


def test_hierarchical_reduces_to_ce_without_smoothing_penalties_or_gamma():
    h = parse_hierarchy("lineages: {x: [A, B, C]}\nsmoothing: 0\ngamma: 0\n")
    loss = make_loss("hierarchical-focal", ["A", "B", "C"], hierarchy=h)
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(16, 3, generator=g), torch.randint(0, 3, (16,), generator=g)
    assert loss(logits, y).item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)


def test_focal_gamma_zero_is_cross_entropy_and_focal_down_weights_easy_cells():
    g = torch.Generator().manual_seed(1)
    logits, y = torch.randn(32, 5, generator=g), torch.randint(0, 5, (32,), generator=g)
    ce = F.cross_entropy(logits, y).item()
    assert focal_loss(logits, y, gamma=0.0).item() == pytest.approx(ce, rel=1e-6)
    assert make_loss("focal", list("abcde"), gamma=0.0)(logits, y).item() == pytest.approx(ce, rel=1e-6)
    assert make_loss("focal", list("abcde"))(logits, y).item() < ce


def test_class_weights_from_train_frequencies_and_given():
    codes = np.array([0, 0, 0, 1])
    w = class_weights(codes, 2)
    assert torch.allclose(w, torch.tensor([4 / 6, 4 / 2]))
    logits, y = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])
    ce = F.cross_entropy(logits, y, reduction="none")
    wce = make_loss("weighted-ce", ["a", "b"], codes)(logits, y)
    assert wce.item() == pytest.approx(((ce * w[y]).mean()).item(), rel=1e-6)
    given = make_loss("weighted-focal", ["a", "b"], weights=[1.0, 3.0], gamma=0.0)(logits, y)
    assert given.item() == pytest.approx(((ce * torch.tensor([1.0, 3.0])).mean()).item(), rel=1e-6)
    with pytest.raises(ValueError, match="no training cells"):
        class_weights(np.array([0, 0]), 2)
    with pytest.raises(ValueError, match="takes no class weights"):
        make_loss("ce", ["a", "b"], weights=[1, 1])


@pytest.mark.parametrize(
    "text, line, match",
    [
        ("lineages:\n  ab: [A, B]\n  c: [Q]\n", 3, "unknown class 'Q'"),
        (
            "lineages: {ab: [A, B]}\npenalties:\n  - {true: A, pred: Z, weight: 2}\n",
            3,
            "unknown class 'Z' in a penalty",
        ),
        ("lineages: {ab: [A, B]}\nsmoothing: 0.1\ngama: 2\n", 3, "unknown key 'gama'"),
        ("lineages: {ab: [A, B]}\nsmoothing: lots\n", 2, "smoothing must be a number"),
        ("lineages: {ab: [A, B]}\nsmoothing: 1.5\n", 2, "smoothing must be >= 0.0 and < 1.0"),
        ("lineages:\n  ab: [A, B\n  c: [C]\n", None, "not valid YAML"),
        ("lineages:\n  ab: [A, B]\n  ba: [B]\n", 3, "already in a lineage \\(line 2\\)"),
        ("lineages: {ab: [A, B]}\npenalties:\n  - {true: A, pred: B}\n", 3, "penalty lacks weight"),
        ("lineages: {ab: A}\n", 1, "must be a list of classes"),
        (  # a duplicated penalty pair (the old code accepted it and summed nothing: the last one won)
            "lineages: {ab: [A, B]}\npenalties:\n  - {true: A, pred: B, weight: 2}\n"
            "  - {true: A, pred: B, weight: 5}\n",
            4,
            "declared twice \\(first on line 3\\)",
        ),
        ("- A\n- B\n", 1, "expected a mapping"),
    ],
)
def test_malformed_files_and_unknown_classes_name_the_line(tmp_path, text, line, match):
    path = tmp_path / "h.yaml"
    path.write_text(text)
    with pytest.raises(HierarchyError, match=match) as err:
        make_loss("hierarchical-focal", ["A", "B", "C"], hierarchy=load_hierarchy(path))
    assert str(path) in str(err.value)
    if line is not None:
        assert f"line {line}:" in str(err.value)
    else:
        assert "line " in str(err.value)


def test_factory_errors():
    with pytest.raises(ValueError, match="unknown loss 'nope'"):
        make_loss("nope", ["a", "b"])
    with pytest.raises(ValueError, match="needs a hierarchy file"):
        make_loss("hierarchical-focal", ["a", "b"])
    with pytest.raises(HierarchyError, match="not found"):
        load_hierarchy("/nonexistent/lineage.yaml")
