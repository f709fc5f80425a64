"""Gradients through inject → update → read (float64, finite differences), and the retriever
BCE's gradients reaching only f_q / f_k."""
from __future__ import annotations

import pytest
import torch

import mplus_fast
from mplus_fast.training import objectives as obj
from mplus_fast.training.trainable import TrainableMPlus, parameter_groups
from mplus_fast.weights import ENCODER_ADAPTER

# The reference computes attention probabilities in float32 whatever the model dtype (SPEC §1),
# so a float64 loss is exact only to ~1e-7 relative: a step of 1e-3 keeps that noise and the
# O(step²) truncation error both near 1e-4 of the gradient (tolerance 1e-3).
EPS, RTOL = 1e-3, 1e-3


def _loss_fn(tm: TrainableMPlus, contexts, question, weights, retrieve: bool):
    """inject every context (with a graph) → update → read the question; a fixed random
    projection of the float64 hidden states entering each layer (logits are float32 by
    contract, too coarse for finite differences). The memory and the generator are reset
    first, so every call makes the same random drops."""
    state0, gen0 = tm.state.clone(), tm.model.generator.get_state()

    def loss():
        tm.model.backend.state = state0.clone()
        tm.model.generator.set_state(gen0)
        for ids in contexts:
            tm.write(tm.inject(ids, grad=True))
        xs = {}
        tm.read(question[None], torch.ones_like(question[None], dtype=torch.bool), retrieve=retrieve,
                observe=lambda l, x: xs.__setitem__(l, x))
        return sum((xs[l] * weights[l]).sum() for l in xs)
    return loss


@pytest.mark.parametrize("retrieve", [False, True])
def test_finite_differences_through_inject_update_read(ckpt_factory, retrieve):
    # 2 layers, T=4, N=16, R=4; ltm_size 6 ≥ R so retrieval scores the bank and the injected
    # rows (dropped into the pending buffer) can be retrieved: gradients reach them through both paths.
    path = ckpt_factory(seed=5, ltm_size=6, num_hidden_layers=3)
    model = mplus_fast.load(path, backend="reference", dtype=torch.float64, seed=1)
    tm = TrainableMPlus(model, ("backbone", "adapters", "retriever"))
    g = torch.Generator().manual_seed(0)
    contexts = [torch.randint(0, 96, (m,), generator=g) for m in (5, 3, 6)]
    question = torch.randint(0, 96, (4,), generator=g)
    weights = torch.randn(3, 1, 4, 48, generator=g, dtype=torch.float64)
    loss = _loss_fn(tm, contexts, question, weights, retrieve)
    value = loss()
    value.backward()
    lin = model.weights.layers[0].proj["v_proj"]
    enc_a, enc_b = lin.adapters["default"]              # the encoder adapter: reached only through the memory
    dec_a, dec_b = lin.adapters["decoder_adapter"]
    up_b = model.weights.layers[1].proj["up_proj"].adapters["default"][1]
    for name, t in (("encoder lora_B", enc_b), ("encoder lora_A", enc_a), ("decoder lora_B", dec_b),
                    ("layer 1 encoder up_proj lora_B", up_b), ("new_memory_positional_emb", model.weights.new_memory_pos),
                    ("embed", model.weights.embed)):
        assert t.grad is not None and t.grad.abs().sum() > 0, f"{name}: no gradient"
        grad = t.grad.clone()
        # Directional derivatives along the gradient and along a random direction: the loss moves
        # by |grad| per unit step, far above the float32-softmax noise, and a path autograd
        # missed would show in one of the two.
        for direction in (grad / grad.norm(), torch.randn(grad.shape, generator=g, dtype=grad.dtype)):
            direction = direction / direction.norm()
            base = t.detach().clone()

            def central(h):
                with torch.no_grad():
                    t.copy_(base + h * direction)
                    up = loss().item()
                    t.copy_(base - h * direction)
                    down = loss().item()
                    t.copy_(base)
                return (up - down) / (2 * h)
            numeric = (4 * central(EPS / 2) - central(EPS)) / 3   # Richardson: the O(h²) error cancels
            analytic = float((grad * direction).sum())
            assert abs(numeric - analytic) <= RTOL * float(grad.norm()), \
                f"{name}: autograd {analytic:.9g} vs finite differences {numeric:.9g} (|grad| {float(grad.norm()):.4g})"


def test_retriever_bce_trains_only_the_selectors(ckpt_factory):
    path = ckpt_factory(seed=6, ltm_size=6)
    model = mplus_fast.load(path, backend="reference", dtype=torch.float64, seed=2)
    tm = TrainableMPlus(model, ("backbone", "adapters", "retriever"))
    g = torch.Generator().manual_seed(1)
    source = tm.next_injection_id()
    for m in (4, 5, 4):
        tm.write(tm.inject(torch.randint(0, 96, (m,), generator=g), grad=False))
    rows = [obj.ReadRow("qa", torch.randint(0, 96, (3,), generator=g).tolist(), [5, 2], source)]
    batch = obj.make_batch(rows, pad_id=0)
    inputs = {}
    tm.read(batch.ids, batch.valid, retrieve=True, query_mask=batch.query_mask, observe=lambda l, x: inputs.__setitem__(l, x))
    loss, count = obj.retriever_loss(tm, inputs, batch)
    assert count == model.config.num_hidden_layers and loss.item() > 0
    loss.backward()
    groups = parameter_groups(model.weights)
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in groups["retriever"])
    assert all(t.grad is None for t in groups["backbone"] + groups["adapters"])


def test_retriever_bce_into_memory_also_trains_the_writing_and_the_questions(ckpt_factory):
    """`into_memory`: the BCE's gradient reaches the encoder adapter through the rows written with
    a graph (the encoder only writes, so a gradient there comes from the bank rows) and the
    backbone through the question's hidden states; detached rows (no graph) contribute nothing."""
    path = ckpt_factory(seed=6, ltm_size=6)
    model = mplus_fast.load(path, backend="reference", dtype=torch.float64, seed=2)
    tm = TrainableMPlus(model, ("backbone", "adapters", "retriever"))
    g = torch.Generator().manual_seed(1)
    source = tm.next_injection_id()
    for i, m in enumerate((4, 5, 4)):
        tm.write(tm.inject(torch.randint(0, 96, (m,), generator=g), grad=i == 0))
    rows = [obj.ReadRow("qa", torch.randint(0, 96, (3,), generator=g).tolist(), [5, 2], source)]
    batch = obj.make_batch(rows, pad_id=0)
    inputs = {}
    tm.read(batch.ids, batch.valid, retrieve=True, query_mask=batch.query_mask, observe=lambda l, x: inputs.__setitem__(l, x))
    loss, _ = obj.retriever_loss(tm, inputs, batch, into_memory=True)
    loss.backward()
    groups = parameter_groups(model.weights)
    encoder = [a for layer in model.weights.layers for lin in layer.proj.values()
               for a in lin.adapters.get(ENCODER_ADAPTER, ())]
    assert encoder and any(t.grad is not None and t.grad.abs().sum() > 0 for t in encoder)
    assert any(t.grad is not None and t.grad.abs().sum() > 0 for t in groups["backbone"])
