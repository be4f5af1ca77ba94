"""Block reconstruction: AdaRound-style learned weight rounding per block (BRECQ, as Q-Diffusion uses it).

For every dmq :class:`~dmq.nn.base.QuantGemm` inside a block, the rounding of each weight (down or up from
``floor(W / s)``) is learned so that the quantized block reproduces the floating-point block's output on recorded
block inputs (:func:`dmq.calibration.collect.collect` with ``blocks=``):

- soft codes ``clamp(floor(W / s) + h(V), qmin, qmax)``, ``h(V) = clamp(sigmoid(V) * (ζ - γ) + γ, 0, 1)`` with
  ``ζ = 1.1, γ = -0.1`` (the rectified sigmoid), ``V`` initialised so that the soft weight starts at ``W``;
- loss: relative output error ``Σ |q(x) - fp(x)|² / Σ |fp(x)|²`` over the block's float outputs, plus
  ``reg_weight * mean(1 - |2 h(V) - 1|^β)`` after a warm-up, ``β`` annealed from 20 to 2 (AdaRound's regularizer,
  which drives every ``h`` to 0 or 1);
- finally ``h >= 0.5`` rounds up: the new integer codes are written into the layer's ``qweight`` through
  :mod:`dmq.formats` (packed for int4), keeping its format and scales (``wscales`` is never changed).

Activation quantizers of the layers (when ``act_quant``) run in the forward with a straight-through gradient.
Supported weight formats: symmetric int8 / int4, per tensor, channel or group. Bounds: ``iters`` Adam steps of
``records_per_iter`` records per block (and ``max_seconds`` per block); memory: one copy of the block's inputs and
float outputs for the given records, plus ``V`` (fp32, one per weight) and Adam's two moments.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from dmq.calibration.collect import BlockRecord
from dmq.errors import CalibrationRequiredError, ConfigError
from dmq.formats import Quantized, dequantize, pack_nibbles, padded_channels, unpack_int4
from dmq.nn.base import QuantGemm

__all__ = ["ReconstructionConfig", "BlockReport", "reconstruct_block", "reconstruct_blocks", "find_blocks",
           "split_records", "block_output_mse"]

logger = logging.getLogger(__name__)

_ZETA, _GAMMA = 1.1, -0.1


@dataclass(frozen=True)
class ReconstructionConfig:
    """``iters``: Adam steps per block; ``lr``: Adam's learning rate on the rounding variables; ``reg_weight``,
    ``beta`` (start, end) and ``warmup`` (fraction of ``iters`` without the regularizer): AdaRound's rounding
    regularizer; ``records_per_iter``: recorded calls per step; ``act_quant``: run the layers' activation quantizers
    (static ones must be calibrated first) or reconstruct weights alone; ``max_seconds``: time limit per block;
    ``keep_if_worse``: keep learned codes even when the held-out error got worse (default: revert to the original
    codes)."""

    iters: int = 400
    lr: float = 1e-1
    reg_weight: float = 0.3
    beta: tuple[float, float] = (20.0, 2.0)
    warmup: float = 0.2
    records_per_iter: int = 1
    act_quant: bool = True
    max_seconds: float | None = None
    keep_if_worse: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.iters, int) or self.iters < 0:
            raise ConfigError(f"iters must be an int >= 0, got {self.iters!r}")
        if not self.lr > 0 or self.reg_weight < 0:
            raise ConfigError("lr must be > 0 and reg_weight >= 0")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"warmup must be in [0, 1), got {self.warmup}")
        if len(self.beta) != 2 or min(self.beta) <= 0:
            raise ConfigError(f"beta must be (start, end) > 0, got {self.beta}")
        if self.records_per_iter < 1:
            raise ConfigError("records_per_iter must be >= 1")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ConfigError("max_seconds must be > 0 or None")


@dataclass
class BlockReport:
    """Output MSE of the quantized block against the float block before and after reconstruction, on the
    training records and on held-out records (NaN when none were given)."""

    name: str
    layers: list[str]
    iters: int
    seconds: float
    train_mse_before: float
    train_mse_after: float
    heldout_mse_before: float = float("nan")
    heldout_mse_after: float = float("nan")
    changed_fraction: float = 0.0
    reverted: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def heldout_gain_db(self) -> float:
        """``10 log10(before / after)`` on held-out records."""
        if not (self.heldout_mse_before > 0 and self.heldout_mse_after > 0):
            return float("nan")
        return 10 * math.log10(self.heldout_mse_before / self.heldout_mse_after)


# ---------------------------------------------------------------------------------------------------------------
# blocks and records


def find_blocks(model: nn.Module) -> list[str]:
    """Names of the reconstruction blocks of a denoiser, in execution order: a U-Net's ResNets, attention
    (transformer) modules and down/up samplers, stage by stage; a transformer's ``transformer_blocks.*`` then
    ``single_transformer_blocks.*``. Only blocks holding a Linear/Conv (or dmq) GEMM are listed."""
    def has_gemm(m: nn.Module) -> bool:
        return any(isinstance(c, (nn.Linear, nn.Conv2d, QuantGemm)) for c in m.modules())

    names: list[str] = []
    if hasattr(model, "down_blocks") or hasattr(model, "up_blocks"):
        stages = [f"down_blocks.{i}" for i in range(len(getattr(model, "down_blocks", [])))]
        if getattr(model, "mid_block", None) is not None:
            stages.append("mid_block")
        stages += [f"up_blocks.{i}" for i in range(len(getattr(model, "up_blocks", [])))]
        for st in stages:
            stage = model.get_submodule(st)
            resnets = list(getattr(stage, "resnets", None) or [])
            attns = list(getattr(stage, "attentions", None) or [])
            order = []
            if st == "mid_block":  # resnet 0, then (attention i, resnet i + 1)
                order = [("resnets", 0)] if resnets else []
                for i in range(max(len(attns), len(resnets) - 1)):
                    order += [("attentions", i)] if i < len(attns) else []
                    order += [("resnets", i + 1)] if i + 1 < len(resnets) else []
            else:  # resnet i, then attention i
                for i in range(len(resnets)):
                    order += [("resnets", i)] + ([("attentions", i)] if i < len(attns) else [])
            for part in ("downsamplers", "upsamplers"):
                order += [(part, i) for i in range(len(getattr(stage, part, None) or []))]
            for part, i in order:
                if has_gemm(getattr(stage, part)[i]):
                    names.append(f"{st}.{part}.{i}")
        return names
    for attr in ("transformer_blocks", "single_transformer_blocks"):
        lst = getattr(model, attr, None)
        if isinstance(lst, nn.ModuleList):
            names += [f"{attr}.{i}" for i, m in enumerate(lst) if has_gemm(m)]
    return names


def split_records(records: Sequence[BlockRecord], heldout_fraction: float = 0.25,
                  seed: int = 0) -> tuple[list[BlockRecord], list[BlockRecord]]:
    """Split recorded calls into (train, held-out) so that held-out ones come from samples (calibration batches)
    and timesteps that training never saw: a fraction of the batches and of the steps is held out; records whose
    batch and step are both held out are the held-out set, records with neither are the training set (mixed ones
    are dropped). With a single batch or a single step, it splits by that axis alone."""
    if not 0 < heldout_fraction < 1:
        raise ConfigError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    recs = list(records)
    if len(recs) < 2:
        raise ConfigError("need at least 2 recorded calls to hold some out")
    g = torch.Generator().manual_seed(seed)

    def pick(values: list[int]) -> set[int]:
        if len(values) < 2:
            return set()
        n = max(1, round(heldout_fraction * len(values)))
        n = min(n, len(values) - 1)
        perm = torch.randperm(len(values), generator=g).tolist()
        return {values[i] for i in perm[:n]}

    hb = pick(sorted({r.batch for r in recs}))
    hs = pick(sorted({r.step for r in recs}))
    if not hb and not hs:
        n = max(1, round(heldout_fraction * len(recs)))
        perm = torch.randperm(len(recs), generator=g).tolist()
        held = set(perm[:n])
        return [r for i, r in enumerate(recs) if i not in held], [recs[i] for i in sorted(held)]
    in_b = (lambda r: r.batch in hb) if hb else (lambda r: True)
    in_s = (lambda r: r.step in hs) if hs else (lambda r: True)
    out_b = (lambda r: r.batch not in hb) if hb else (lambda r: True)
    out_s = (lambda r: r.step not in hs) if hs else (lambda r: True)
    heldout = [r for r in recs if in_b(r) and in_s(r)]
    train = [r for r in recs if out_b(r) and out_s(r)]
    if not train or not heldout:
        raise ConfigError(f"cannot split {len(recs)} records into disjoint samples and timesteps; record more "
                          "(more samples, more timesteps or a larger max_block_records)")
    return train, heldout


# ---------------------------------------------------------------------------------------------------------------
# learned rounding of one layer


class _Rounding:
    """AdaRound state of one QuantGemm: element scales ``S``, ``floor(W / S)`` and the rounding variables ``V``
    (all ``(N, T, Cp)`` fp32)."""

    def __init__(self, name: str, layer: QuantGemm, w3: torch.Tensor) -> None:
        spec = layer.weight_spec
        qt = spec.qtype
        if qt.is_float or not spec.symmetric:
            raise ConfigError(f"{name}: reconstruction learns rounding for symmetric integer weights (int8/int4); "
                              f"got {spec.describe()}")
        self.name, self.layer, self.spec = name, layer, spec
        n, t, c = layer.out_features, layer.taps, layer.channels
        if tuple(w3.shape) != (n, t, c):
            raise ConfigError(f"{name}: float weight {tuple(w3.shape)} does not match the quantized layer "
                              f"{(n, t, c)}")
        cp = padded_channels(spec, c)
        q = layer.quantized_weight()
        dev = q.scales.device
        ones = torch.ones(n, t, cp, dtype=torch.int8, device=dev)
        codes_ones = pack_nibbles(ones) if qt.packed else ones
        self.S = dequantize(Quantized(codes_ones, q.scales, None, None), spec, cp).to(dev)
        wp = F.pad(w3.to(device=dev, dtype=torch.float32), (0, cp - c))
        s_div = torch.where(self.S > 0, self.S, torch.ones_like(self.S))
        ratio = wp / s_div
        self.base = torch.floor(ratio)
        frac = (ratio - self.base).clamp(0.0, 1.0)
        self.orig_codes = self.codes_of(layer)
        rtn = torch.round(ratio).clamp(qt.qmin, qt.qmax)
        agree = (rtn == self.orig_codes.float()).float().mean().item()
        if agree < 0.99:
            raise ConfigError(f"{name}: its stored codes are not the rounding of the float weight with its own scales "
                              f"({agree:.1%} agree): was the weight transformed (smoothed, low-rank) after "
                              "quantization? Reconstruction needs the float weight that was quantized")
        p = ((frac - _GAMMA) / (_ZETA - _GAMMA)).clamp(1e-4, 1 - 1e-4)
        self.V = nn.Parameter(torch.log(p / (1 - p)))
        self.qmin, self.qmax, self.c = float(qt.qmin), float(qt.qmax), c

    @staticmethod
    def codes_of(layer: QuantGemm) -> torch.Tensor:
        """Signed int8 codes ``(N, T, Cp)`` of the stored weight (a copy)."""
        codes = layer.quantized_weight().codes
        return unpack_int4(codes) if layer.weight_spec.qtype.packed else codes.to(torch.int8, copy=True)

    def h(self) -> torch.Tensor:
        return (torch.sigmoid(self.V) * (_ZETA - _GAMMA) + _GAMMA).clamp(0.0, 1.0)

    def soft_weight(self) -> torch.Tensor:
        codes = (self.base + self.h()).clamp(self.qmin, self.qmax)
        return (codes * self.S)[..., : self.c]

    def regularizer(self, beta: float) -> torch.Tensor:
        return (1 - (2 * self.h() - 1).abs().pow(beta)).mean()

    def hard_codes(self) -> torch.Tensor:
        with torch.no_grad():
            up = (self.h() >= 0.5).to(self.base.dtype)
            return (self.base + up).clamp(self.qmin, self.qmax).to(torch.int8)

    def write(self, codes: torch.Tensor) -> None:
        """Store signed codes ``(N, T, Cp)`` as the layer's ``qweight`` (packed for 4-bit), in place."""
        packed = pack_nibbles(codes) if self.spec.qtype.packed else codes
        qw = self.layer.qweight
        with torch.no_grad():
            qw.copy_(packed.reshape(qw.shape).to(dtype=qw.dtype, device=qw.device))


def _float_weight3(module: nn.Module) -> torch.Tensor:
    """A float Linear/Conv2d weight as ``(N, T, C)`` (the layout of :mod:`dmq.formats`)."""
    w = module.weight.detach()
    if isinstance(module, nn.Linear):
        return w.reshape(w.shape[0], 1, w.shape[1])
    if isinstance(module, nn.Conv2d):
        cout, cin, kh, kw = w.shape
        return w.permute(0, 2, 3, 1).reshape(cout, kh * kw, cin)
    raise ConfigError(f"no float weight layout for {type(module).__name__}")


def _float_weight_for(fp_block: nn.Module, q_block: nn.Module, lname: str, block: str) -> torch.Tensor:
    """The float ``(N, T, C)`` weight behind the QuantGemm ``lname`` of ``q_block``: the float layer of the same
    name, or, for part ``i`` of a split-shortcut layer (``<split>.parts.<i>``), the input-channel range of the
    float layer it was cut from."""
    parent, _, idx = lname.rpartition(".")
    owner_name, _, attr = parent.rpartition(".")
    if attr == "parts" and idx.isdigit():
        owner = q_block.get_submodule(owner_name) if owner_name else q_block
        if hasattr(owner, "bounds"):
            a, b = owner.bounds[int(idx)]
            fp = fp_block.get_submodule(owner_name) if owner_name else fp_block
            return _float_weight3(fp)[..., a:b]
    try:
        return _float_weight3(fp_block.get_submodule(lname))
    except AttributeError:
        raise ConfigError(f"{block}.{lname}: the float block has no layer of that name") from None


@contextlib.contextmanager
def _patched(roundings: Sequence[_Rounding], soft: bool, act_quant: bool) -> Iterator[None]:
    """Temporarily route each layer through its reference forward, with the soft weight (when ``soft``) and a
    straight-through activation quantizer (or none when not ``act_quant``)."""
    touched = []
    try:
        for r in roundings:
            layer = r.layer
            layer.forward = layer.reference_forward
            touched.append((layer, "forward"))
            if soft:
                layer.dequantized_weight = r.soft_weight
                touched.append((layer, "dequantized_weight"))
            if not act_quant:
                layer.quantize_input = lambda x: x
            else:
                def ste(x: torch.Tensor, _layer: QuantGemm = layer) -> torch.Tensor:
                    y = type(_layer).quantize_input(_layer, x.detach())
                    return x + (y - x).detach() if x.requires_grad else y
                layer.quantize_input = ste
            touched.append((layer, "quantize_input"))
        yield
    finally:
        for layer, attr in touched:
            layer.__dict__.pop(attr, None)


def _float_outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _float_outputs(o)]
    if hasattr(out, "to_tuple"):
        return _float_outputs(out.to_tuple())
    return []


def _sq_err(q_out: list[torch.Tensor], fp_out: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
    err = sum(((a.float() - b.float()) ** 2).sum() for a, b in zip(q_out, fp_out))
    power = sum((b.float() ** 2).sum() for b in fp_out)
    return err, power, sum(b.numel() for b in fp_out)


def block_output_mse(block: nn.Module, inputs: Sequence[tuple[tuple, dict]],
                     targets: Sequence[list[torch.Tensor]]) -> float:
    """Mean squared error of ``block``'s float outputs against ``targets`` over recorded inputs."""
    err, n = 0.0, 0
    with torch.no_grad():
        for (args, kwargs), tgt in zip(inputs, targets):
            e, _, k = _sq_err(_float_outputs(block(*args, **kwargs)), tgt)
            err, n = err + float(e), n + k
    return err / max(n, 1)


# ---------------------------------------------------------------------------------------------------------------
# one block


def reconstruct_block(fp_block: nn.Module, q_block: nn.Module, train: Sequence[BlockRecord],
                      heldout: Sequence[BlockRecord] = (), *, config: ReconstructionConfig = ReconstructionConfig(),
                      name: str = "block") -> BlockReport:
    """Learn the weight rounding of every QuantGemm in ``q_block`` (same structure as ``fp_block``, whose
    Linear/Conv2d at the same names hold the float weights) on ``train`` records; write the hard-rounded codes into
    the layers in place. Returns before/after output MSE on ``train`` and ``heldout``. ``fp_block`` is not
    changed; on any error the layers keep their original codes."""
    if not train:
        raise ConfigError(f"{name}: no recorded inputs to reconstruct on")
    start = time.perf_counter()
    roundings: list[_Rounding] = []
    for lname, layer in q_block.named_modules():
        if not isinstance(layer, QuantGemm):
            continue
        roundings.append(_Rounding(f"{name}.{lname}", layer, _float_weight_for(fp_block, q_block, lname, name)))
    if not roundings:
        return BlockReport(name, [], 0, 0.0, float("nan"), float("nan"), notes=["no quantized layer in block"])
    if config.act_quant:
        for r in roundings:
            if r.layer.input_scale is not None and torch.isnan(r.layer.input_scale):
                raise CalibrationRequiredError(f"{r.name}: its static activation range is not calibrated yet; "
                                               "calibrate it first or use ReconstructionConfig(act_quant=False)")
    device = roundings[0].V.device
    tr_in = [rec.load(device) for rec in train]
    ho_in = [rec.load(device) for rec in heldout]
    fp_block.eval()
    q_block.eval()
    with torch.no_grad():
        tr_tgt = [_float_outputs(fp_block(*a, **k)) for a, k in tr_in]
        ho_tgt = [_float_outputs(fp_block(*a, **k)) for a, k in ho_in]
    if any(not t for t in tr_tgt):
        raise ConfigError(f"{name}: the block returned no floating-point tensor to reconstruct")

    def evaluate() -> tuple[float, float]:
        with _patched(roundings, soft=False, act_quant=config.act_quant):
            tr = block_output_mse(q_block, tr_in, tr_tgt)
            ho = block_output_mse(q_block, ho_in, ho_tgt) if ho_in else float("nan")
        return tr, ho

    tr_before, ho_before = evaluate()
    frozen = [p for p in q_block.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    params = [r.V for r in roundings]
    opt = torch.optim.Adam(params, lr=config.lr)
    g = torch.Generator().manual_seed(config.seed)
    warm = int(config.warmup * config.iters)
    b0, b1 = config.beta
    done = 0
    try:
        with torch.enable_grad(), _patched(roundings, soft=True, act_quant=config.act_quant):
            for it in range(config.iters):
                if config.max_seconds is not None and time.perf_counter() - start > config.max_seconds:
                    break
                idx = torch.randint(0, len(tr_in), (config.records_per_iter,), generator=g).tolist()
                err = power = 0.0
                for i in idx:
                    a, k = tr_in[i]
                    e, p, _ = _sq_err(_float_outputs(q_block(*a, **k)), tr_tgt[i])
                    err, power = err + e, power + p
                loss = err / power.clamp(min=1e-30)
                if it >= warm and config.reg_weight > 0:
                    frac = (it - warm) / max(config.iters - warm - 1, 1)
                    beta = b0 + (b1 - b0) * frac
                    loss = loss + config.reg_weight * sum(r.regularizer(beta) for r in roundings) / len(roundings)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                done += 1
        new_codes = [r.hard_codes() for r in roundings]
        for r, c in zip(roundings, new_codes):
            r.write(c)
        tr_after, ho_after = evaluate()
    except BaseException:
        for r in roundings:
            r.write(r.orig_codes)
        raise
    finally:
        for p in frozen:
            p.requires_grad_(True)
    changed = sum(int((c != r.orig_codes).sum()) for r, c in zip(roundings, new_codes))
    total = sum(c.numel() for c in new_codes)
    report = BlockReport(name, [r.name for r in roundings], done, 0.0, tr_before, tr_after, ho_before, ho_after,
                         changed / max(total, 1))
    worse = (ho_after > ho_before) if ho_in else (tr_after > tr_before)
    if worse and not config.keep_if_worse:
        for r in roundings:
            r.write(r.orig_codes)
        report.reverted = True
        report.notes.append("output error got worse: original codes kept")
    report.seconds = time.perf_counter() - start
    return report


# ---------------------------------------------------------------------------------------------------------------
# a whole denoiser


def reconstruct_blocks(model: nn.Module, built: Mapping[str, nn.Module],
                       block_inputs: Mapping[str, Sequence[BlockRecord]], *,
                       config: ReconstructionConfig = ReconstructionConfig(), heldout_fraction: float = 0.25,
                       progress: bool = True) -> dict[str, BlockReport]:
    """Reconstruct the quantized layers ``built`` (full module names in ``model`` → dmq layer, as returned by
    :func:`dmq.pipelines.quantize.prepare_model`, before they are swapped in) block by block, against the float
    ``model``, on ``block_inputs`` (block name → recorded calls, from :func:`collect` with ``blocks=``). Each
    block's records are split by :func:`split_records` into training and held-out sets. The built layers' codes
    are updated in place; ``model`` is not changed (each block is copied once, its GEMM leaves replaced by the
    built layers)."""
    reports: dict[str, BlockReport] = {}
    for bname in tqdm(list(block_inputs), desc="dmq reconstruction", disable=not progress, leave=False):
        recs = list(block_inputs[bname])
        fp_block = model.get_submodule(bname)
        prefix = bname + "."
        mine = {n[len(prefix):]: layer for n, layer in built.items() if n.startswith(prefix)}
        if not mine or not recs:
            continue
        q_block = copy.deepcopy(fp_block)
        for rel, layer in mine.items():
            parent, _, child = rel.rpartition(".")
            setattr(q_block.get_submodule(parent) if parent else q_block, child, layer)
        if len(recs) >= 2:
            train, heldout = split_records(recs, heldout_fraction, config.seed)
        else:
            train, heldout = recs, []
        reports[bname] = reconstruct_block(fp_block, q_block, train, heldout, config=config, name=bname)
        del q_block
    return reports
