"""Stage 02: prompt ensemble, anchors, the two-anchor softmax, text map."""

from __future__ import annotations

import math

import pytest
import torch

from winclip_nb import TextAnchors
from winclip_nb.core.anchors import (
    ANOMALOUS_STATES,
    NORMAL_STATES,
    TEMPLATES,
    anomaly_probability,
    average_anchor,
    build_prompts,
    prompt_anchors,
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
    anchors = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # (normal, anomalous)
    # temperature 0.5: logits = cos / 0.5 = 2 cos
    out = text_map(tokens, anchors, temperature=0.5)
    p_norm = torch.sigmoid(torch.tensor(-2.0))  # softmax([2, 0])[1]
    p_anom = torch.sigmoid(torch.tensor(2.0))
    expected = torch.tensor([[(p_norm + p_anom) / 2, p_anom]])  # mean over layers
    assert torch.allclose(out, expected)


def test_global_text_score_hand_computed():
    """The image-level text score is the same two-anchor softmax (T = 0.1: logits 10 cos)."""
    emb = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    anchors = torch.stack([torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])])
    score = anomaly_probability(emb, anchors, 0.1)
    assert torch.allclose(score, torch.sigmoid(torch.tensor([10 * (0.8 - 0.6), -10.0])))


def test_anomaly_probability_equals_softmax_by_hand():
    """Unnormalised inputs of any leading shape: cosines, divided by T, softmax, index 1."""
    torch.manual_seed(0)
    emb = torch.randn(2, 3, 5) * 4.0  # (..., D), far from unit norm
    anchors = torch.randn(2, 5) * 3.0
    temperature = 0.07
    out = anomaly_probability(emb, anchors, temperature)
    assert out.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            x = emb[i, j]
            cos = [float(x @ a / (x.norm() * a.norm())) for a in anchors]
            e_n, e_a = (math.exp(c / temperature) for c in cos)
            assert float(out[i, j]) == pytest.approx(e_a / (e_n + e_a), rel=1e-5, abs=1e-7)
    # the scale of the inputs does not matter; swapping the anchors gives 1 - p
    assert torch.allclose(anomaly_probability(emb * 7.0, anchors / 3.0, temperature), out)
    assert torch.allclose(anomaly_probability(emb, anchors.flip(0), temperature), 1 - out)
    # a lower temperature sharpens the same decision
    sharp = anomaly_probability(emb, anchors, temperature / 10)
    assert torch.equal(sharp > 0.5, out > 0.5)
    assert ((sharp - 0.5).abs() >= (out - 0.5).abs() - 1e-6).all()


def test_text_anchors_unpack_and_carry_the_class_name():
    normal, anomalous = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    anchors = TextAnchors(normal, anomalous, "weave")
    assert isinstance(anchors, tuple) and len(anchors) == 2
    n, a = anchors
    assert n is normal and a is anomalous
    assert anchors.class_name == "weave"
    # the tensors carry the name too, so anchors passed on as two tensors keep it
    assert n.class_name == "weave" and a.class_name == "weave"
    again = TextAnchors(n, a)
    assert again.class_name == "weave"
    assert torch.equal(anchors.stacked(), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    # plain tensors without a name: no class name
    assert TextAnchors(torch.zeros(2), torch.ones(2)).class_name is None


def test_prompt_anchors_average_each_half():
    seen = {}

    def encode(prompts, normalize=True):
        seen["prompts"], seen["normalize"] = list(prompts), normalize
        # one-hot rows: prompt i -> e_i (dimension = number of prompts)
        return torch.eye(len(prompts))

    anchors = prompt_anchors(encode, "screw", ["{}", "good {}"], ["bad {}"], ["a {}."],
                             normalize=False)  # fmt: skip
    assert seen["prompts"] == ["a screw.", "a good screw.", "a bad screw."]
    assert seen["normalize"] is False
    assert anchors.class_name == "screw"
    normal, anomalous = anchors
    assert torch.allclose(normal, torch.tensor([1.0, 1.0, 0.0]) / math.sqrt(2))
    assert torch.allclose(anomalous, torch.tensor([0.0, 0.0, 1.0]))


def test_anchors_from_model_are_unit_vectors_and_differ(random_winclip):
    anchors = random_winclip.build_text_anchors("screw")
    normal, anomalous = anchors
    assert normal.shape == anomalous.shape == (512,)
    assert torch.allclose(normal.norm(), torch.tensor(1.0), atol=1e-5)
    assert torch.allclose(anomalous.norm(), torch.tensor(1.0), atol=1e-5)
    assert not torch.allclose(normal, anomalous)
    # the class comes with the anchors (there is no winclip.class_name any more)
    assert anchors.class_name == "screw"
    assert normal.class_name == anomalous.class_name == "screw"
    assert isinstance(anchors, TextAnchors)


def test_text_anchors_never_rename_tagged_tensors():
    normal, anomalous = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    weave = TextAnchors(normal, anomalous, "weave")
    other = TextAnchors(normal, anomalous, "disc")  # another name for this object only
    assert (weave.class_name, other.class_name) == ("weave", "disc")
    assert normal.class_name == anomalous.class_name == "weave"
    assert TextAnchors(normal, anomalous).class_name == "weave"  # from the tensors
