import pytest
import torch
import torch.nn.functional as Fn

from dafar.train.models import ARCHS, Unpool, build_dafar, build_victim, l2_per_sample, mask_unpool


def _count(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
@pytest.mark.parametrize("unpool", ["mask", "maxunpool", "upsample"])
def test_shapes(dataset, unpool):
    spec = ARCHS[dataset]
    net = build_dafar(dataset, unpool).eval()
    x = torch.rand(3, *spec.input_shape) * 2 - 1
    feats = net.E(x)
    c2 = spec.enc_channels[-1]
    assert feats.z.shape == (3, c2, spec.height // 4, spec.width // 4)
    assert [p.pre.shape[-1] for p in feats.pools] == [spec.width, spec.width // 2]
    logits, recon = net(x)
    assert logits.shape == (3, 10) and recon.shape == x.shape
    assert recon.abs().max() <= 1  # Tanh output
    assert net.purified_logits(recon).shape == (3, 10)
    assert net.C(x - recon).shape == x.shape
    assert net.l2_score(x, recon).shape == (3,) and net.ae_score(x, recon).shape == (3,)
    assert build_victim(dataset)(x).shape == (3, 10)


def test_parameter_counts_follow_the_tables():
    m = build_dafar("mnist")
    conv = lambda ci, co, k=3: ci * co * k * k + co  # noqa: E731
    lin = lambda i, o: i * o + o  # noqa: E731
    assert _count(m.E) == conv(1, 32) + conv(32, 32) + conv(32, 64) + conv(64, 64)
    assert _count(m.F) == lin(64 * 7 * 7, 200) + lin(200, 200) + lin(200, 10)
    assert _count(m.C) == lin(784, 256) + lin(256, 32) + lin(32, 256) + lin(256, 784)
    c = build_dafar("cifar10")
    assert _count(c.E) == conv(3, 96) + 2 * conv(96, 96) + conv(96, 192) + 2 * conv(192, 192)
    assert _count(c.F) == conv(192, 192) + conv(192, 192, 1) + conv(192, 10, 1) + lin(640, 200) + lin(200, 200) + lin(200, 10)
    assert _count(c.C) == lin(3072, 512) + lin(512, 64) + lin(64, 512) + lin(512, 3072)
    # ConvTranspose(ci, co) holds ci*co*9 weights and co biases
    convt = lambda ci, co: ci * co * 9 + co  # noqa: E731
    assert _count(m.D) == convt(64, 64) + convt(64, 32) + convt(32, 32) + convt(32, 1)
    assert _count(c.D) == 2 * convt(192, 192) + convt(192, 96) + 2 * convt(96, 96) + convt(96, 3)


def test_mask_unpool_equals_maxunpool_without_ties():
    torch.manual_seed(0)
    pre = torch.randn(4, 8, 16, 16)  # continuous values: no ties within a window
    pooled, idx = Fn.max_pool2d(pre, 2, 2, return_indices=True)
    h = torch.randn_like(pooled)
    want = Fn.max_unpool2d(h, idx, 2, 2, output_size=pre.shape[-2:])
    assert torch.equal(mask_unpool(h, pre, pooled), want)


def test_mask_unpool_tie_rule():
    # one window with a repeated non-zero maximum, one all-zero window
    pre = torch.tensor([[[[2.0, 2.0, 0.0, 0.0], [1.0, 0.5, 0.0, 0.0]]]])
    pooled, idx = Fn.max_pool2d(pre, 2, 2, return_indices=True)
    h = torch.tensor([[[[5.0, 7.0]]]])
    out = mask_unpool(h, pre, pooled)
    # every tied maximum position receives the value (MaxUnpool: only the first)
    assert out[0, 0, 0, :2].tolist() == [5.0, 5.0] and out[0, 0, 1, :2].tolist() == [0.0, 0.0]
    ref = Fn.max_unpool2d(h, idx, 2, 2, output_size=pre.shape[-2:])
    assert ref[0, 0, 0, :2].tolist() == [5.0, 0.0]
    # all-zero window (post-ReLU background): every position ties, so h is spread like nearest upsampling
    assert out[0, 0, :, 2:].eq(7.0).all()
    assert ref[0, 0, :, 2:].flatten().tolist() == [7.0, 0.0, 0.0, 0.0]


def test_gradients_flow_through_the_unpool_to_the_decoder_input():
    net = build_dafar("mnist")
    x = (torch.rand(2, 1, 28, 28) * 2 - 1).requires_grad_()
    _, recon = net(x)
    l2_per_sample(x - recon).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in net.D.parameters())
    assert all(p.grad is not None for p in net.E.parameters())


def test_unpool_enum_rejects_unknown():
    with pytest.raises(ValueError):
        build_dafar("mnist", "bilinear")
    assert Unpool("mask") is Unpool.MASK


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 40, 24), (3, 96, 128)])
def test_mobile_network_shapes_costs_and_folded_batch_norm(shape):
    from dafar.errors import ConfigError
    from dafar.train.cost import subnet_costs
    from dafar.train.mobile import fold_batchnorm
    from dafar.train.models import build_dafar, paper_spec

    spec = paper_spec("mobile", shape, 7, "linear", 0.5)
    net = build_dafar(spec)
    for m in net.modules():  # non-trivial statistics, as after training
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    net.eval()
    x = torch.rand(2, *shape) * 2 - 1
    with torch.no_grad():
        logits, recon = net(x)
        folded = fold_batchnorm(net)
        logits_f, recon_f = folded(x)
    assert logits.shape == (2, 7) and recon.shape == x.shape
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    torch.testing.assert_close(logits_f, logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(recon_f, recon, rtol=1e-4, atol=1e-4)
    c = subnet_costs(net)
    assert c["E"]["macs"] > 0 and c["D"]["macs"] > 0
    with pytest.raises(ConfigError, match="divisible"):
        paper_spec("mobile", (3, 30, 30), 10)


def test_mobile_costs_a_fifth_of_the_paper_cifar_victim():
    from dafar.train.cost import subnet_costs
    from dafar.train.models import build_dafar, paper_spec

    mobile = subnet_costs(build_dafar(paper_spec("mobile", (3, 32, 32), 10)))
    paper = subnet_costs(build_dafar("cifar10"))
    assert mobile["E"]["macs"] + mobile["F"]["macs"] <= (paper["E"]["macs"] + paper["F"]["macs"]) / 5


@pytest.mark.parametrize("family,shape,positions", [
    ("paper-mnist", (1, 28, 28), ("pool1", "pool2")),
    ("paper-cifar10", (3, 32, 32), ("pool1", "pool2")),
    ("mobile", (3, 32, 32), ("stage1", "stage2")),
    ("mobile", (1, 96, 64), ("stage1", "stage2")),
])
def test_feedback_positions_resplit_the_same_classifier(family, shape, positions):
    """Moving the feedback position moves layers between E and F without changing a weight: the
    classifier's logits are bit-identical; D mirrors E, so it is cheaper at the earlier position."""
    from dafar.errors import ConfigError
    from dafar.train.cost import subnet_costs
    from dafar.train.models import paper_spec, resplit_victim

    base = paper_spec(family, shape, 5)
    assert base.feedback == "" and base.feedback_at == positions[-1]  # the default stays unnamed (old manifests)
    torch.manual_seed(0)
    ref_net = build_dafar(base).eval()
    x = torch.randn(4, *shape)
    with torch.no_grad():
        ref = ref_net.F(ref_net.E(x).z)
    macs = {}
    for fb, width in [(p, w) for p in positions for w in (1.0, 0.5)]:  # a narrower D moves with the position
        spec = paper_spec(family, shape, 5, feedback=fb, decoder_width=width)
        net = build_dafar(spec).eval()
        e, f = resplit_victim(ref_net.E.state_dict(), ref_net.F.state_dict(), base, spec)
        net.E.load_state_dict(e, strict=True)
        net.F.load_state_dict(f, strict=True)
        with torch.no_grad():
            feats = net.E(x)
            assert torch.equal(net.F(feats.z), ref)
            assert net.D(feats).shape == x.shape
        # and back again: the round trip is the identity
        e2, f2 = resplit_victim(e, f, spec, base)
        assert all(torch.equal(e2[k], v) for k, v in ref_net.E.state_dict().items())
        assert all(torch.equal(f2[k], v) for k, v in ref_net.F.state_dict().items())
        if width == 1.0:
            macs[fb] = subnet_costs(net)
    first, last = (macs[p] for p in positions)
    assert first["D"]["macs"] < last["D"]["macs"] and first["E"]["macs"] < last["E"]["macs"]
    assert first["E"]["macs"] + first["F"]["macs"] == last["E"]["macs"] + last["F"]["macs"]
    with pytest.raises(ConfigError, match="does not exist"):
        paper_spec(family, shape, 5, feedback="layer9")
    other = paper_spec("paper-mnist" if family != "paper-mnist" else "paper-cifar10", (3, 32, 32), 5)
    with pytest.raises(ConfigError, match="different networks"):
        resplit_victim(ref_net.E.state_dict(), ref_net.F.state_dict(), base, other)


@pytest.mark.parametrize("family,shape,positions", [
    ("paper-mnist", (1, 28, 28), ("pool1", "pool2")),
    ("paper-cifar10", (3, 32, 32), ("pool1", "pool2")),
    ("mobile", (3, 32, 32), ("stage1", "stage2")),
    ("mobile", (1, 96, 64), ("stage1", "stage2")),
])
def test_decoder_width_narrows_only_the_decoder(family, shape, positions):
    """--decoder-width w: D's hidden layers narrow (its MACs fall roughly with w, at least by the
    first layer's share), E, F and C are unchanged, D still rebuilds the input's shape; width 1 is
    the paper's decoder, with the same state-dict keys and shapes as before the option existed."""
    from dafar.errors import ConfigError
    from dafar.train.cost import subnet_costs
    from dafar.train.models import paper_spec, spec_from_record

    for fb in positions:
        full = build_dafar(paper_spec(family, shape, 5, feedback=fb))
        assert {k: v.shape for k, v in full.D.state_dict().items()} == \
               {k: v.shape for k, v in build_dafar(paper_spec(family, shape, 5, feedback=fb, decoder_width=1)).D.state_dict().items()}
        c_full = subnet_costs(full)
        prev = c_full["D"]["macs"]
        for w in (0.5, 0.25):
            net = build_dafar(paper_spec(family, shape, 5, feedback=fb, decoder_width=w)).eval()
            c = subnet_costs(net)
            assert {k: c[k] for k in "EFC"} == {k: c_full[k] for k in "EFC"}
            assert c["D"]["macs"] < 0.75 * prev and c["D"]["params"] < c_full["D"]["params"]
            prev = c["D"]["macs"]
            x = torch.rand(2, *shape)
            with torch.no_grad():
                assert net.D(net.E(x)).shape == x.shape
    # the manifest carries it; manifests from before the option read as width 1
    rec = {"architecture": {"family": family, "num_classes": 5, "decoder_width": 0.5}, "input": {"shape": list(shape)}}
    assert spec_from_record(rec).decoder_width == 0.5
    del rec["architecture"]["decoder_width"]
    assert spec_from_record(rec).decoder_width == 1.0
    for bad in (0, 0.1, 1.5, True, "half"):
        with pytest.raises(ConfigError, match="decoder width"):
            paper_spec(family, shape, 5, decoder_width=bad)


@pytest.mark.parametrize("arch,shape,feedback,width", [("paper-mnist", (1, 28, 28), None, 1.0),
                                                       ("paper-cifar10", (3, 32, 32), None, 1.0),
                                                       ("paper-mnist", (1, 28, 28), "pool1", 0.5),
                                                       ("paper-cifar10", (3, 16, 24), "pool1", 0.25)])
def test_deploy_form_turns_decoder_transposed_convs_into_equal_convs(arch, shape, feedback, width):
    """What export runs: the same function as the trained module, with no ConvTranspose2d left
    (onnx2tf writes those as TRANSPOSE_CONV + STRIDED_SLICE + RELU, slower and refused in int8
    by tflite-runtime 2.14), and the trained module itself unchanged."""
    from dafar.train.models import build_dafar, deploy_form, paper_spec

    torch.manual_seed(0)
    spec = paper_spec(arch, shape, 10, "tanh", 1.0, feedback, width)
    net = build_dafar(spec).eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert any(isinstance(m, torch.nn.ConvTranspose2d) for m in net.modules())
    dep = deploy_form(net)
    assert not any(isinstance(m, torch.nn.ConvTranspose2d) for m in dep.modules())
    assert any(isinstance(m, torch.nn.ConvTranspose2d) for m in net.modules())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    x = torch.rand(3, *shape) * 2 - 1
    with torch.no_grad():
        (logits, recon), (logits_d, recon_d) = net(x), dep(x)
        score, score_d = net.l2_score(x, recon), dep.l2_score(x, recon_d)
    assert torch.equal(logits, logits_d)  # E and F are not touched
    torch.testing.assert_close(recon_d, recon, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(score_d, score, rtol=1e-5, atol=1e-7)


def test_conv_from_convtranspose_refuses_what_is_not_a_convolution():
    from dafar.train.models import conv_from_convtranspose

    torch.manual_seed(0)
    assert conv_from_convtranspose(torch.nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1)) is None
    assert conv_from_convtranspose(torch.nn.ConvTranspose2d(4, 6, 3, padding=0)) is None  # grows the map
    assert conv_from_convtranspose(torch.nn.ConvTranspose2d(4, 6, 3, padding=1, groups=2)) is None
    for k, p, bias in ((3, 1, True), (5, 2, False), (1, 0, True)):
        m = torch.nn.ConvTranspose2d(4, 6, k, padding=p, bias=bias)
        c = conv_from_convtranspose(m)
        x = torch.randn(2, 4, 9, 7)
        with torch.no_grad():
            torch.testing.assert_close(c(x), m(x), rtol=1e-5, atol=1e-5)


def test_upsample_decoder_ignores_the_encoders_pools():
    """--unpool upsample: D upsamples E's features without a mask, so what E's pools did (the
    pre-pool activations the mask would read) does not reach D; and the same weights under the mask
    give another reconstruction (the two are different functions, trained in separately)."""
    torch.manual_seed(0)
    net = build_dafar("mnist", "upsample").eval()
    x = torch.rand(2, 1, 28, 28) * 2 - 1
    with torch.no_grad():
        feats = net.E(x)
        want = net.D(feats)
        scrambled = feats._replace(pools=tuple(p._replace(pre=torch.randn_like(p.pre)) for p in feats.pools))
        assert torch.equal(net.D(scrambled), want)
        inner = net.D.inner(Fn.interpolate(feats.z, scale_factor=2.0, mode="nearest"))
        assert torch.allclose(net.D.outer(Fn.interpolate(inner, scale_factor=2.0, mode="nearest")), want)
        masked = build_dafar("mnist", "mask").eval()
        masked.load_state_dict(net.state_dict())
        assert not torch.allclose(masked.D(feats), want)
