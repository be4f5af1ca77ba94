"""Block reconstruction (AdaRound-style learned rounding): held-out improvement on a tiny U-Net block, codes
written back in the layer's own format, bad inputs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

try:
    import tiny_pipelines as tp
except ImportError:  # pragma: no cover
    from tests import tiny_pipelines as tp

from dmq.calibration.collect import BlockRecord, collect_block_inputs
from dmq.calibration.config import CalibrationConfig
from dmq.calibration.reconstruction import (ReconstructionConfig, _Rounding, find_blocks, reconstruct_block,
                                            reconstruct_blocks, split_records)
from dmq.errors import CalibrationRequiredError, ConfigError
from dmq.formats import QuantSpec
from dmq.nn import QuantGemm, quantize_module

A8 = QuantSpec("int8", "token")



pytestmark = pytest.mark.usefixtures("one_thread")

def quantize_block(block: nn.Module, wspec: QuantSpec, aspec: QuantSpec | None = A8,
                   prefix: str = "") -> tuple[nn.Module, dict[str, QuantGemm]]:
    """A copy of ``block`` whose Linear/Conv2d leaves are dmq layers (round-to-nearest), and those layers."""
    q = copy.deepcopy(block)
    built = {}
    for name, m in list(q.named_modules()):
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            c = m.in_features if isinstance(m, nn.Linear) else m.in_channels
            layer = quantize_module(m, wspec.fitted(c), aspec.fitted(c) if aspec else None, name)
            parent, _, child = name.rpartition(".")
            setattr(q.get_submodule(parent) if parent else q, child, layer)
            built[prefix + name] = layer
    return q, built


def toy_records(block: nn.Module, shape: tuple, n: int, seed: int) -> list[BlockRecord]:
    g = torch.Generator().manual_seed(seed)
    return [BlockRecord.capture("toy", i, i, 0.5, (torch.randn(*shape, generator=g) * (1 + i % 3),), {}, None)
            for i in range(n)]


def conv_block() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.SiLU(), nn.Conv2d(32, 32, 1)).eval()


def mlp_block() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)).eval()


@pytest.mark.parametrize("make, shape, wspec", [
    (mlp_block, (4, 16, 64), QuantSpec("int4", "group", 32)),
    (mlp_block, (4, 16, 64), QuantSpec("int8", "channel")),
    (conv_block, (4, 32, 8, 8), QuantSpec("int4", "channel")),
    (conv_block, (4, 32, 8, 8), QuantSpec("int8", "group", 16)),
])
def test_codes_are_written_in_the_layers_format(make, shape, wspec):
    fp = make()
    q, built = quantize_block(fp, wspec)
    before = {n: (l.qweight.clone(), l.wscales.clone(), l.dequantized_weight(),
                  _Rounding(n, l, fp_weight(fp, n)).S[..., : l.channels]) for n, l in built.items()}
    train, held = toy_records(fp, shape, 8, 0), toy_records(fp, shape, 3, 1)
    rep = reconstruct_block(fp, q, train, held, config=ReconstructionConfig(iters=80, keep_if_worse=True))
    assert rep.train_mse_after < rep.train_mse_before
    if wspec.dtype == "int4":  # at 8 bits rounding matters little: the held-out change is noise
        assert rep.heldout_mse_after < rep.heldout_mse_before
    assert 0 < rep.changed_fraction < 0.5
    for n, layer in built.items():
        qw, ws, w_old, step = before[n]
        assert layer.qweight.dtype == qw.dtype and layer.qweight.shape == qw.shape
        assert torch.equal(layer.wscales, ws)  # format and scales kept: only the codes change
        assert layer.weight_spec == wspec.fitted(layer.channels)
        # every weight moved by at most one quantization step (a rounding flip)
        moved = (layer.dequantized_weight() - w_old).abs() / step.clamp(min=1e-12)
        assert float(moved.max()) <= 1.0 + 1e-4 and float(moved.max()) > 0.5


def fp_weight(block: nn.Module, name: str) -> torch.Tensor:
    from dmq.calibration.reconstruction import _float_weight3

    return _float_weight3(block.get_submodule(name))


def test_reconstruction_lowers_heldout_error_on_a_unet_block():
    pipe = tp.build_pipeline("sd")
    unet = pipe.unet
    block = "down_blocks.0.attentions.0"
    cfg = CalibrationConfig(prompts=["a photo of a cat", "a red house", "a tree by a lake"], num_samples=6,
                            num_inference_steps=6, num_timesteps=6)
    records = collect_block_inputs(pipe, [block], cfg, max_block_records=36, progress=False)[block]
    assert len(records) == 36
    train, held = split_records(records, heldout_fraction=1 / 3, seed=0)
    # held out: samples (calibration batches) and timesteps that training never saw
    assert not {r.batch for r in train} & {r.batch for r in held}
    assert not {r.step for r in train} & {r.step for r in held}
    assert len(train) == 16 and len(held) == 4
    fp = unet.get_submodule(block)
    q, built = quantize_block(fp, QuantSpec("int4", "group", 64))
    rep = reconstruct_block(fp, q, train, held, config=ReconstructionConfig(iters=150), name=block)
    assert not rep.reverted
    assert rep.train_mse_after < 0.9 * rep.train_mse_before
    assert rep.heldout_mse_after < 0.9 * rep.heldout_mse_before  # >= 0.45 dB on unseen samples and timesteps
    assert rep.heldout_gain_db > 0.45
    assert len(rep.layers) == len(built)


def test_reconstruct_blocks_leaves_the_float_model_alone():
    fp = mlp_block()
    model = nn.Sequential(fp, nn.Identity())
    _, built = quantize_block(fp, QuantSpec("int4", "group", 32), prefix="0.")
    w0 = [p.clone() for p in model.parameters()]
    recs = toy_records(fp, (4, 16, 64), 8, 2)
    for i, r in enumerate(recs):
        r.batch, r.step = i % 4, i // 4 * 2 + i % 2
    reports = reconstruct_blocks(model, built, {"0": recs}, config=ReconstructionConfig(iters=40), progress=False)
    assert set(reports) == {"0"} and reports["0"].heldout_mse_before == reports["0"].heldout_mse_before
    assert all(torch.equal(a, b) for a, b in zip(w0, model.parameters()))
    assert isinstance(model[0][0], nn.Linear)  # nothing swapped into the float model


def test_reconstruction_bad_inputs_change_nothing():
    fp = mlp_block()
    recs = toy_records(fp, (2, 4, 64), 3, 0)
    q, built = quantize_block(fp, QuantSpec("fp8_e4m3", "channel"))
    with pytest.raises(ConfigError, match="integer"):
        reconstruct_block(fp, q, recs)
    q, built = quantize_block(fp, QuantSpec("int4", "group", 32), QuantSpec("int8", "tensor", dynamic=False))
    before = {n: l.qweight.clone() for n, l in built.items()}
    with pytest.raises(CalibrationRequiredError, match="calibrate"):
        reconstruct_block(fp, q, recs)
    other = mlp_block()
    with torch.no_grad():
        other[0].weight.mul_(3.0)  # not the weight these codes were made from
    q2, _ = quantize_block(fp, QuantSpec("int4", "group", 32))
    with pytest.raises(ConfigError, match="transformed"):
        reconstruct_block(other, q2, recs)
    with pytest.raises(ConfigError, match="no recorded inputs"):
        reconstruct_block(fp, q, [])
    assert all(torch.equal(before[n], l.qweight) for n, l in built.items())
    with pytest.raises(ConfigError):
        ReconstructionConfig(iters=-1)
    with pytest.raises(ConfigError, match="at least 2"):
        split_records(recs[:1])


def test_failure_mid_optimization_restores_the_codes():
    fp = mlp_block()
    q, built = quantize_block(fp, QuantSpec("int4", "group", 32))
    before = {n: l.qweight.clone() for n, l in built.items()}
    recs = toy_records(fp, (2, 4, 64), 2, 0)
    calls = {"n": 0}

    def boom(module, args):
        calls["n"] += 1
        if calls["n"] > 6:  # after the 'before' evaluation, during training
            raise RuntimeError("boom")

    h = q[2].register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        reconstruct_block(fp, q, recs, config=ReconstructionConfig(iters=20))
    h.remove()
    assert all(torch.equal(before[n], l.qweight) for n, l in built.items())
    assert all("forward" not in l.__dict__ for l in built.values())  # no patched method left behind


def test_find_blocks():
    unet_blocks = find_blocks(tp.build_pipeline("sd").unet)
    assert unet_blocks[:3] == ["down_blocks.0.resnets.0", "down_blocks.0.attentions.0",
                               "down_blocks.0.downsamplers.0"]
    assert "mid_block.attentions.0" in unet_blocks and "up_blocks.1.attentions.1" in unet_blocks
    assert find_blocks(tp.build_pipeline("flux").transformer) == ["transformer_blocks.0",
                                                                  "single_transformer_blocks.0"]
    assert find_blocks(tp.build_pipeline("dit").transformer) == ["transformer_blocks.0", "transformer_blocks.1"]


def test_split_shortcut_parts_are_reconstructed_against_their_channel_range():
    from dmq.nn.split import SplitQuantConv2d

    fp = conv_block()
    q = copy.deepcopy(fp)
    q[0] = SplitQuantConv2d.from_module(fp[0], (12,), QuantSpec("int4", "channel"), A8)
    q[2] = quantize_module(fp[2], QuantSpec("int4", "channel"), A8)
    before = [p.qweight.clone() for p in q[0].parts]
    rep = reconstruct_block(fp, q, toy_records(fp, (4, 32, 8, 8), 8, 0), toy_records(fp, (4, 32, 8, 8), 3, 1),
                            config=ReconstructionConfig(iters=60, keep_if_worse=True))
    assert rep.layers == ["block.0.parts.0", "block.0.parts.1", "block.2"]
    assert rep.train_mse_after < rep.train_mse_before
    assert any(not torch.equal(b, p.qweight) for b, p in zip(before, q[0].parts))
