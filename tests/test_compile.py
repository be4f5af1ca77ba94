"""torch.compile of quantized layers and denoisers: no graph breaks (``fullgraph=True``, one captured graph), no
recompiles across timesteps, and the same outputs as eager.

Tolerances: dynamo alone (a counting backend that runs the captured graph) and ``aot_eager`` run the very same ATen
ops as eager on the CPU, so their outputs must be bit-identical. Inductor fuses and reorders float math; where that
moves an activation onto the other side of a rounding boundary, one int4 code of a token flips and that token's
outputs move by one quantization step (about 1% of max|y| for this layer). The inductor case allows max|Δ| ≤ 5% of
max|y| and requires 90% of the elements within 1e-4 · max|y|.
"""

import pytest
import torch
from torch import nn

import dmq
import dmq.models
from dmq.config import get_preset
from dmq.nn.timestep import attach_timestep_state
from dmq.pipelines.quantize import LayerPlan, build_layer
from tiny_pipelines import build_pipeline, denoiser_inputs, get_denoiser

PRESETS = ["w8a8", "w4a4", "w4a16", "fp8", "svdquant-w4a4", "svdquant-nvfp4", "svdquant-w4a4-2l", "w8a8-static"]


class CountingBackend:
    """A torch.compile backend that runs the captured graph as is and counts the graphs it was given."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.graphs += 1
        return gm.forward


@pytest.fixture(autouse=True)
def _fresh_dynamo(one_thread):
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _layer(preset: str, conv: bool) -> nn.Module:
    torch.manual_seed(0)
    module = nn.Conv2d(64, 64, 3, padding=1) if conv else nn.Linear(128, 64)
    cfg = get_preset(preset)
    layer = build_layer(LayerPlan("layer", module, "quantized", cfg.weight, cfg.activation), cfg, None, "layer")
    if layer.input_scale is not None:  # a static range, as calibration would set it
        layer.input_scale.fill_(0.02)
    return layer


def _input(conv: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn((2, 64, 6, 6) if conv else (3, 7, 128), generator=g)


@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv"])
@pytest.mark.parametrize("preset", PRESETS)
def test_quantized_layer_is_one_graph_and_matches_eager(preset, conv):
    layer, x = _layer(preset, conv), _input(conv)
    backend = CountingBackend()
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    with torch.no_grad():
        assert torch.equal(compiled(x), layer(x))
        assert torch.equal(torch.compile(layer, backend="aot_eager", fullgraph=True)(x), layer(x))
    assert backend.graphs == 1


def test_per_timestep_ranges_do_not_recompile_across_timesteps():
    torch.manual_seed(0)
    cfg = get_preset("tfmq-w4a8")
    plan = LayerPlan("proj", nn.Linear(128, 64), "quantized", cfg.weight, cfg.activation)
    layer = build_layer(plan, cfg, None, "proj")
    layer.input_scale.copy_(torch.tensor([0.01, 0.02, 0.04, 0.08]))

    class Denoiser(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = layer

        def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
            return self.proj(x)

    model = Denoiser()
    attach_timestep_state(model, [layer], 4, 1000, "dit")  # the pre-hook that sets the bucket
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    x, steps = _input(False), (999, 600, 300, 10)  # one timestep in each of the 4 buckets
    with torch.no_grad():
        outs = [compiled(x, torch.tensor([steps[0]]))]
        first = backend.graphs
        outs += [compiled(x, torch.tensor([t])) for t in steps[1:]]
        refs = [model(x, torch.tensor([t])) for t in steps]
    assert all(torch.equal(a, b) for a, b in zip(outs, refs))
    assert not torch.equal(outs[0], outs[-1])  # the bucket really changes the range
    assert backend.graphs == first  # every later bucket runs the graphs compiled on the first call


def _one_graph(model: nn.Module, *args, **kwargs) -> None:
    """fullgraph=True raises on any graph break; the backend counts the graphs; outputs equal eager."""
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    with torch.no_grad():
        assert torch.equal(compiled(*args, **kwargs)[0], model(*args, **kwargs)[0])
    assert backend.graphs == 1


def test_tiny_unet_denoiser_is_one_graph():
    pipe = dmq.quantize_pipeline(build_pipeline("ddpm"), "w4a8", progress=False)
    _one_graph(get_denoiser(pipe), **denoiser_inputs(pipe, "ddpm", 500.0), return_dict=False)


def test_shipped_dit_is_one_graph():
    pipe = dmq.quantize_pipeline(dmq.models.load("digits-dit"), "svdquant-w4a4", progress=False)
    model = pipe.transformer
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, model.config.in_channels, model.config.sample_size, model.config.sample_size, generator=g)
    _one_graph(model, x, timestep=torch.tensor([500, 500]), class_labels=torch.tensor([3, 10]), return_dict=False)


def test_inductor_matches_eager_within_tolerance():
    layer, x = _layer("svdquant-w4a4", conv=False), _input(False)
    compiled = torch.compile(layer, backend="inductor", fullgraph=True)
    with torch.no_grad():
        y, ref = compiled(x), layer(x)
    err = (y - ref).abs() / ref.abs().max()
    assert err.max() <= 5e-2 and (err <= 1e-4).float().mean() >= 0.9, (err.max(), (err > 1e-4).float().mean())


@pytest.mark.parametrize("family,blocks", [("flux", ("FluxTransformerBlock", "FluxSingleTransformerBlock")),
                                           ("pixart", ("BasicTransformerBlock",)),
                                           ("sdxl", ("BasicTransformerBlock", "ResnetBlock2D"))])
def test_compile_blocks_compiles_each_repeated_block_once_per_class(family, blocks, monkeypatch):
    """Regional compilation over dmq's kernel path (the CPU custom ops run their references): the repeated blocks
    (declared by diffusers, or found by class for PixArt-Σ; a U-Net's conv blocks beside its declared transformer
    blocks) compile to one graph per class and shape, without graph breaks, and the denoiser's output is
    unchanged."""
    from dmq.kernels import linear as klinear
    from dmq.pipelines.compile import compile_blocks, repeated_block_classes

    monkeypatch.setattr(klinear, "_gpu_ok", lambda x: True)
    pipe = dmq.quantize_pipeline(build_pipeline(family), "svdquant-w4a4-2l", progress=False)
    model = get_denoiser(pipe)
    inputs = denoiser_inputs(pipe, family, 500.0)
    assert repeated_block_classes(model) == blocks
    with torch.no_grad():
        ref = model(**inputs)[0]
        backend = CountingBackend()
        names = compile_blocks(model, backend=backend, fullgraph=True)
        assert names and all(type(model.get_submodule(n)).__name__ in blocks for n in names)
        assert torch.equal(model(**inputs)[0], ref)
        graphs = backend.graphs
        assert torch.equal(model(**inputs)[0], ref)
    # a DiT's blocks share their shapes; a U-Net's come in several channel counts and resolutions, but below
    # dynamo's recompile limit per class (past it the rest would run eagerly)
    per_class = 2 if family != "sdxl" else torch._dynamo.config.recompile_limit
    assert 0 < graphs <= per_class * len(blocks) and backend.graphs == graphs   # nothing recompiles on a 2nd call


def test_compile_blocks_needs_a_module_with_repeated_blocks():
    with pytest.raises(dmq.ConfigError, match="no repeated blocks"):
        dmq.compile_blocks(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    with pytest.raises(dmq.ConfigError, match="pipe.transformer or pipe.unet"):
        dmq.compile_blocks(build_pipeline("pixart"))


@pytest.mark.parametrize("family", ["pixart", "flux"])
def test_compiled_blocks_with_8bit_attention_do_not_recompile(family, monkeypatch):
    """8-bit attention hooks inside compiled blocks: the output equals eager and later calls compile nothing new
    (the hooks' call counters once made every call recompile). FLUX's processor still breaks the graph where it
    calls ``Tensor.unflatten`` under the hook's TorchFunctionMode, so only PixArt-Σ stays one graph per block."""
    from dmq.kernels import linear as klinear
    from dmq.methods.attention import enable_quantized_attention

    monkeypatch.setattr(klinear, "_gpu_ok", lambda x: True)
    pipe = dmq.quantize_pipeline(build_pipeline(family), "svdquant-w4a4-2l", progress=False)
    model = get_denoiser(pipe)
    enable_quantized_attention(model)
    inputs = denoiser_inputs(pipe, family, 500.0)
    with torch.no_grad():
        ref = model(**inputs)[0]
        backend = CountingBackend()
        names = dmq.compile_blocks(model, backend=backend)
        assert torch.equal(model(**inputs)[0], ref)
        graphs = backend.graphs
        assert torch.equal(model(**inputs)[0], ref) and torch.equal(model(**inputs)[0], ref)
    assert backend.graphs == graphs
    if family == "pixart":
        assert graphs == len(names)
