"""Stage 02: prompt ensemble, anchors, text map."""

from __future__ import annotations

import torch

from winclip_nb.anchors import (
    ANOMALOUS_STATES,
    NORMAL_STATES,
    TEMPLATES,
    average_anchor,
    build_prompts,
    global_text_score,
    readable_class_name,
    text_map,
)


def test_prompts_compose_states_and_templates():
    normal, anomalous = build_prompts("metal_nut")
    assert len(normal) == len(NORMAL_STATES) * len(TEMPLATES)
    assert len(anomalous) == len(ANOMALOUS_STATES) * len(TEMPLATES)
    assert "a close-up photo of a flawless metal nut." in normal
    assert "a close-up photo of a damaged metal nut." in anomalous
    assert not set(normal) & set(anomalous)
    assert readable_class_name("metal_nut") == "metal nut"


def test_average_anchor_is_normalised_mean():
    anchor = average_anchor(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]))
    expected = torch.tensor([1.6, 1.8]) / torch.tensor([1.6, 1.8]).norm()
    assert torch.allclose(anchor, expected)


def test_text_map_hand_computed():
    # B=1, L=2, N=2, D=2. Layer 0 patch 0 equals the normal anchor, patch 1 the anomalous.
    tokens = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [0.0, 1.0]]]])
    normal, anomalous = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    out = text_map(tokens, normal, anomalous, temperature=2.0)
    p_norm = torch.sigmoid(torch.tensor(-2.0))  # softmax([2, 0])[1]
    p_anom = torch.sigmoid(torch.tensor(2.0))
    expected = torch.tensor([[(p_norm + p_anom) / 2, p_anom]])  # mean over layers
    assert torch.allclose(out, expected)


def test_global_text_score_hand_computed():
    emb = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    score = global_text_score(emb, torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), 10.0)
    assert torch.allclose(score, torch.sigmoid(torch.tensor([10 * (0.8 - 0.6), -10.0])))


def test_anchors_from_model_are_unit_vectors_and_differ(random_winclip):
    normal, anomalous = random_winclip.build_text_anchors("screw")
    assert normal.shape == anomalous.shape == (512,)
    assert torch.allclose(normal.norm(), torch.tensor(1.0), atol=1e-5)
    assert torch.allclose(anomalous.norm(), torch.tensor(1.0), atol=1e-5)
    assert not torch.allclose(normal, anomalous)
    assert random_winclip.class_name == "screw"
