"""The packed pair: one network of the original architecture whose logits are the mean
of D_1(A)'s and D_1(B)'s; the midpoint of step 3 of the dropout-stable path."""
from __future__ import annotations

import pytest
import torch

from mcensemble import zoo  # noqa: F401  (registers mce_* with timm)
from mcensemble.pack import pack_pair, pack_report
from mcensemble.paths.dropout import build_dropout_path
from mcensemble.errors import DropoutPathError
from mcensemble.stability import dropout_network, dropout_stability

from helpers import assert_close_rel, small_eval_loader, small_pair


@pytest.fixture(scope="module", params=["mlp", "cnn"])
def pair(request):
    if request.param == "mlp":
        return small_pair("mce_digits_mlp", 20, width=32, drop_rate=0.3)
    return small_pair("mce_digits_cnn", 6, widths=(6, 8))


def stabilities_and_packed(model, a, b, ld, search_steps):
    """Both endpoints' dropout stability and the pair packed with them."""
    sa = dropout_stability(model, a, ld, search_steps=search_steps)
    sb = dropout_stability(model, b, ld, search_steps=search_steps)
    return sa, sb, pack_pair(model, a, b, ld, stability_a=sa, stability_b=sb).state


def logits(model, state, x):
    model.load_state_dict(state)
    with torch.no_grad():
        return model(x)


def test_packed_logits_are_the_mean_of_the_dropout_networks(pair):
    model, a, b = pair
    ld = small_eval_loader()
    sa, sb, packed = stabilities_and_packed(model, a, b, ld, search_steps=4)
    assert packed.keys() == a.keys()
    assert all(packed[k].shape == a[k].shape and packed[k].dtype == a[k].dtype for k in a)
    d1a, _ = dropout_network(model, a, sa.graph, sa.kept, 1, bn_loader=ld)
    d1b, _ = dropout_network(model, b, sb.graph, sb.kept, 1, bn_loader=ld)
    x = next(iter(ld))[0]
    want = (logits(model, d1a, x) + logits(model, d1b, x)) / 2
    got = logits(model, packed, x)
    assert_close_rel(got, want)  # relative: logits of size ~15 differ in the last bits between CPUs
    # and not simply one of the two
    assert not torch.allclose(got, logits(model, d1a, x), atol=1e-3)


def test_packed_is_the_midpoint_of_the_path_switch(pair):
    model, a, b = pair
    ld = small_eval_loader()
    sa, sb, packed = stabilities_and_packed(model, a, b, ld, search_steps=2)
    path = build_dropout_path(model, a, b, ld, stability_a=sa, stability_b=sb)
    i = [s["step"] for s in path.certificate["segments"]].index("classifier from D_1(A) to D_1(B)")
    seg = path.certificate["segments"][i]
    mid = path.state_at((seg["t0"] + seg["t1"]) / 2)
    for k in a:
        assert_close_rel(mid[k], packed[k], msg=k)


def test_loads_in_plain_timm(pair):
    import timm
    model, a, b = pair
    packed = pack_pair(model, a, b, small_eval_loader(), search_steps=0).state
    arch = "mce_digits_mlp" if "layers.1.weight" in a else "mce_digits_cnn"
    kw = {"width": 32, "drop_rate": 0.3} if arch == "mce_digits_mlp" else {"widths": (6, 8)}
    net = timm.create_model(arch, num_classes=10, in_chans=1, **kw).eval()
    net.load_state_dict(packed, strict=True)
    assert net(next(iter(small_eval_loader()))[0]).shape == (250, 10)


def test_report(pair):
    model, a, b = pair
    ld = small_eval_loader()
    packed = pack_pair(model, a, b, ld, search_steps=0).state
    rep = pack_report(model, packed, a, b, ld)
    assert set(rep) == {"packed", "A", "B", "ensemble"}
    for m in rep.values():
        assert 0 <= m["acc"] <= 1 and m["nll"] > 0 and m["n"] == 500
    # the mean-probability ensemble is never worse than the mean member NLL (Jensen)
    assert rep["ensemble"]["nll"] <= (rep["A"]["nll"] + rep["B"]["nll"]) / 2 + 1e-9
    assert rep["packed"]["acc"] > 0.5


def test_unsupported_graph():
    import torch.nn as nn

    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.head = nn.Linear(64, 8), nn.Linear(8, 8), nn.Linear(8, 10)

        def forward(self, x):
            h = self.fc1(x.flatten(1))
            return self.head(h + self.fc2(h))
    net = Skip().eval()
    with pytest.raises(DropoutPathError):
        pack_pair(net, net.state_dict(), net.state_dict(), small_eval_loader(), search_steps=0)


@pytest.mark.parametrize("examples", [None, 200])
def test_certificate_bounds_the_packed_models_training_loss(pair, examples):
    """eps and the bound: the packed logits are the mean of D_1(A)'s and D_1(B)'s and cross
    entropy is convex in the logits, so its loss is at most the mean of theirs, on the data
    the certificate names (all of it, or the fixed subsample)."""
    from mcensemble.bn import FixedSubset
    from mcensemble.evaluate import evaluate
    model, a, b = pair
    ld = small_eval_loader()
    res = pack_pair(model, a, b, ld, search_steps=2, data_examples=examples)
    c = res.certificate
    assert c["eps"] == pytest.approx(max(c["eps_a"], c["eps_b"], 0.0))
    assert c["eps_a"] == pytest.approx(c["loss_da"] - c["loss_a"])
    assert c["bound"] == pytest.approx((c["loss_da"] + c["loss_db"]) / 2)
    data = ld if examples is None else FixedSubset(ld, examples)
    assert ("subsample" in c["data"]["losses"]) == (examples is not None)
    model.load_state_dict(a)
    assert c["loss_a"] == pytest.approx(evaluate(model, data).loss, rel=1e-5)
    model.load_state_dict(res.state)
    assert evaluate(model, data).loss <= c["bound"] * (1 + 1e-5)
    assert set(res.search) == {"A", "B"} and res.search["A"]["steps"] == 2
