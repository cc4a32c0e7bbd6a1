"""int8 weights: symmetric, per output channel, for every linear layer and the tied embedding/head.

The file stores int8 tensors and float32 per-row scales; in memory they stay int8. On CPU the
matmuls run in fbgemm's dynamic int8 linear (int8 x int8 -> int32 on VNNI), packed once at load, with
activations quantized per call, and per sequence in a batch (see `_fbgemm_per_sequence`), to 7 bits
where fbgemm's products would saturate (`fbgemm_saturates`); elsewhere the int8 weight is converted one
layer at a time, per call.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptgen.checkpoint import TIED
from gptgen.model import GPT

_Packed = torch.classes.quantized.LinearPackedParamsBase  # fbgemm's packed weight, a TorchScript class
SCALE = ".scale"  # the file stores `X.weight` (int8) beside `X.weight.scale` (float32, one per row)


def is_quantized(name: str, shape: tuple[int, ...]) -> bool:
    """The one rule for which tensors an int8 file stores as int8: every matrix but the position embedding."""
    return len(shape) == 2 and name != "transformer.wpe.weight"


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, float32 scale per row) with w ≈ q * scale[:, None]."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[:, None]


def _fbgemm_ok(device: torch.device) -> bool:
    return device.type == "cpu" and "fbgemm" in torch.backends.quantized.supported_engines


def _range_rows(width: int, reduce_range: bool) -> torch.Tensor:
    """Rows holding -128 and 127 (-64 and 63 with `reduce_range`): appended to integer-valued activations, they
    make fbgemm's range exactly that, so its scale is 1 and its zero point 128 (64), and the integers pass
    through unchanged. One row, or two for a width of 1 (one row of width 1 held -128 alone)."""
    half = 64.0 if reduce_range else 128.0
    ends = torch.tensor([[-half], [half - 1]])
    return ends if width == 1 else F.pad(ends.view(1, 2), [0, width - 2])


@functools.cache
def fbgemm_saturates() -> bool:
    """Whether this CPU's fbgemm needs 7-bit activations (0..127; PyTorch's `reduce_range`) to compute exactly.
    Without VNNI (AVX2; AVX-512 before Cascade Lake; AMD before Zen 4) fbgemm adds pairs of uint8 x int8
    products in int16, which saturates (255 * 127 * 2 > 32767): a row of 127s times activations at their
    maximum came out 32258 instead of 4096639, and a 768 -> 3072 layer's error was 1.35% instead of 0.72%
    (measured with FBGEMM_ENABLE_INSTRUCTIONS=AVX2). So the worst case is tried once: exact, the full range."""
    width = 64
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        q = torch._make_per_channel_quantized_tensor(torch.full((1, width), 127, dtype=torch.int8),
                                                     torch.ones(1, dtype=torch.double),
                                                     torch.zeros(1, dtype=torch.long), 0)
    packed = torch.ops.quantized.linear_prepack(q, None)
    x = torch.cat([torch.full((1, width), 127.0), _range_rows(width, False)])  # 127 is uint8 255: the largest
    return _linear_dynamic(x, packed, False)[0, 0].item() != 127 * 127 * width


_LINEAR_DYNAMIC = torch.ops.quantized.linear_dynamic.default


def _linear_dynamic(x: torch.Tensor, packed, reduce_range: bool) -> torch.Tensor:
    """fbgemm's dynamic int8 linear, called with __torch_function__ checks off: with them on, PyTorch looks for
    `__torch_function__` on the packed weight (a TorchScript object) by throwing and catching a C++
    exception, 6 of the 9 µs a small call took (measured; a token makes 49 calls). x is a plain tensor,
    so nothing changes but the time."""
    with torch._C.DisableTorchFunctionSubclass():
        return _LINEAR_DYNAMIC(x, packed, reduce_range)


def _fbgemm_qparams(lo: torch.Tensor, hi: torch.Tensor, reduce_range: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 scale, float64 zero point) per sequence from its float32 min and max, as PyTorch's fbgemm dynamic
    linear chooses them (quant_utils::ChooseQuantizationParams, uint8 0..255, or 0..127 with `reduce_range`),
    step for step: the same float32 and float64 roundings, in as few ops as keep them (this runs for every
    layer of a batched step).
    """
    top = 127 if reduce_range else 255
    small_scale = 6.0999998822808266e-05  # fbgemm's smallest scale: 6.1e-5 in float32 (fp16's smallest normal)
    # `top` of them, in float32 arithmetic (TorchScript takes no global numbers)
    small_range = 0.007747000083327293 if reduce_range else 0.015554999932646751
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    scale = (hi.double() - lo) / top
    small = scale < small_scale  # includes every scale that is 0 or whose inverse overflows in float32
    if bool(small.any()):
        scale32 = scale.float()
        degenerate = (scale32 == 0) | torch.isinf(scale32.reciprocal())  # these get scale 0.1, range unchanged
        small &= ~degenerate  # these widen their range to the smallest scale
        amplifier = torch.full_like(lo, small_scale) / scale32  # a tensor divided, not a number: one rounding
        lo_small = torch.where(lo == 0, lo, torch.where(hi == 0, -small_range, lo * amplifier))
        hi_small = torch.where(lo == 0, small_range, torch.where(hi == 0, hi, hi * amplifier))
        lo, hi = torch.where(small, lo_small, lo), torch.where(small, hi_small, hi)
        scale = torch.where(small, small_scale, torch.where(degenerate, 0.1, scale))
    low, high = lo / scale, hi / scale  # float64; low <= 0 <= high, so -|low| is low and |high| is high
    zero = torch.where(low < top - high, -low, top - high)
    return scale.float(), zero.round().clamp(0, top)  # out of range: the end; else nearest, ties to even


def _fbgemm_per_sequence(x: torch.Tensor, packed: _Packed, col_sums: torch.Tensor, reduce_range: bool
                         ) -> torch.Tensor:
    """fbgemm's dynamic linear (unit weight scales) of each sequence x[b], bit for bit as if called alone.

    fbgemm quantizes a call's activations with one scale and zero point, so in a batch one sequence's
    values would change another's rounding. Here each sequence's uint8 values are computed the way
    fbgemm computes them for a call of its own (`_fbgemm_qparams`, then round(fma(x, 1 / scale, zero
    point)) as its AVX2 code does); they go through one fbgemm call as integers shifted by -128 (-64 with
    `reduce_range`), and each sequence's int32 sums are corrected for its zero point before its scale is applied.
    TorchScript compiles it into the decode step; Python runs it where TorchScript is missing.
    """
    B, K = x.size(0), x.size(-1)
    lo, hi = torch.aminmax(x.reshape(B, -1), dim=1)
    scale, zero = _fbgemm_qparams(lo, hi, reduce_range)
    shape = [B] + [1] * (x.dim() - 1)
    inverse = scale.reciprocal().double().view(shape)
    t = torch.addcmul(zero.view(shape), x.double(), inverse).float()  # fma: rounded to float once
    # round half to even, minus 128 (64): adding 1.5 * 2**23 leaves no fraction bits (torch.round is not vectorized)
    half = 64 if reduce_range else 128
    q = t.add_(12582912.0).sub_(12582912.0 + half).clamp_(-half, half - 1).view(-1, K)
    y = torch.ops.quantized.linear_dynamic(torch.cat([q, _range_rows(K, reduce_range)]), packed,
                                           reduce_range)[:q.size(0)].unflatten(0, x.shape[:-1])
    return torch.addcmul(y, (half - zero).float().view(shape), col_sums).mul_(scale.view(shape))


def _rescale(y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """fbgemm's output (unit weight scales) times the row scales, plus the bias."""
    return y * scale if bias is None else torch.addcmul(bias, y, scale)


class Int8Linear(nn.Module):
    """y = x W^T + b with W held as int8 rows and their scales (the bias stays float)."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)
        self._packed = None
        self._col_sums = None
        self._reduce_range = False  # fbgemm's activation range, chosen at pack: the column sums are taken in it

    def pack(self, keep_weight: bool = False) -> None:
        """Lay the weight out for fbgemm once, at load. fbgemm keeps its own int8 copy, so the plain one is
        dropped (int8_weight() rebuilds it on demand), unless kept: the tied head's, whose rows the embedding
        looks up."""
        if self._packed is not None or not _fbgemm_ok(self.scale.device):
            return
        with warnings.catch_warnings():  # quantized tensors are deprecated as a user type; fbgemm's ops are not
            warnings.simplefilter("ignore", UserWarning)
            ones = torch.ones_like(self.scale, dtype=torch.double)  # the row scales go on after, with the bias
            q = torch._make_per_channel_quantized_tensor(self.weight, ones, torch.zeros_like(ones, dtype=torch.long), 0)
        self._packed = torch.ops.quantized.linear_prepack(q, None)
        self._reduce_range = fbgemm_saturates()
        # each output's sum of weights, by fbgemm itself: a row of ones (exact, with the range row), no copy
        probe = torch.cat([torch.ones(1, self.weight.size(1)), _range_rows(self.weight.size(1), self._reduce_range)])
        self._col_sums = _linear_dynamic(probe, self._packed, self._reduce_range)[0]
        if not keep_weight:
            self.weight = None

    def int8_weight(self) -> torch.Tensor:
        if self.weight is not None:
            return self.weight
        return torch.ops.quantized.linear_unpack(self._packed)[0].int_repr()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is not None and x.is_cpu:
            x = x.float().contiguous()
            if x.dim() < 3 or x.size(0) == 1:  # one sequence: fbgemm's own call, without the dispatch checks
                return _rescale(_linear_dynamic(x, self._packed, self._reduce_range), self.scale, self.bias)
            # sequence by sequence
            return _int8_layer(x, self._packed, self._col_sums, self.scale, self.bias, self._reduce_range)
        w = self.int8_weight()
        if torch.compiler.is_compiling() and x.numel() == x.size(-1):  # one row: a compiled decoding step
            # As a product and a sum, inductor makes one kernel that reads the int8 weight itself. Written as a
            # matmul, it converts the whole weight to a float copy first and calls the float matmul on that
            # (inductor fuses the conversion into a matmul only under max-autotune): more bytes than the
            # float model itself; that form decoded at 0.43x bf16's speed on an H200.
            y = (x.unsqueeze(-2) * w.to(x.dtype)).sum(-1)
        else:
            y = F.linear(x, w.to(x.dtype))
        y = y * self.scale.to(x.dtype)  # the output scaled, not the weight: N multiplies instead of N x K
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def _apply(self, fn, recurse=True):
        if self._packed is not None:  # moved or cast: back to the plain weight; pack() again if wanted
            self.weight = self.int8_weight()
            self._packed = None
        return super()._apply(fn, recurse)


class Int8Embedding(nn.Module):
    """Embedding lookup from the same int8 rows and scales as the tied head: only the rows used are dequantized."""

    def __init__(self, head: Int8Linear) -> None:
        super().__init__()
        self.head = [head]  # a list, so the tensors are not registered (and saved) twice
        self.file_rows = None  # the rows read from the model file, where the head keeps only fbgemm's copy (pack())

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        head = self.head[0]
        rows = head.weight[idx] if head.weight is not None else self.file_rows[idx.cpu()].to(idx.device)
        return rows.to(head.scale.dtype) * head.scale[idx, None]  # the model's float dtype


def quantize_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A float model's weights -> the int8 file's tensors: every 2-D weight but the position embedding (and the
    tied head, which a model's state_dict() holds beside the embedding it is)."""
    out = {}
    for name, t in state.items():
        if name == TIED:
            continue
        if is_quantized(name, tuple(t.shape)):
            out[name], out[name + SCALE] = quantize_rows(t)
        else:
            out[name] = t.float()  # a half-precision model's norms and biases too: int8 layers take float32
    return out


def int8_model(config, tensors: dict[str, torch.Tensor]) -> GPT:
    """A GPT whose linear layers and tied embedding/head are int8 modules over the file's tensors.

    The tied pair: lm_head is one Int8Linear over `transformer.wte.weight` and its scales, and the
    embedding looks rows up in that same module, so the int8 tensor exists once in memory.
    """
    with torch.device("meta"):
        model = GPT(config)
    # The float tensors are copied out of the file's memory map (and pack() reads the int8 ones again), so that
    # map is released once loading is done.
    # float32, as fbgemm's int8 layers take it, also from a file whose norms and biases are half precision
    float_tensors = {k: v.to(torch.float32, copy=True) for k, v in tensors.items()
                     if v.dtype != torch.int8 and not k.endswith(SCALE)}
    model.load_state_dict(float_tensors, strict=False, assign=True)
    wte = "transformer.wte.weight"
    head = Int8Linear(tensors[wte], tensors[wte + SCALE].clone(), None)
    model.lm_head = head
    model.transformer.wte = Int8Embedding(head)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child is not head:
                key = f"{name}.{child_name}" if name else child_name
                weight, scale, bias = (tensors.get(key + suffix) for suffix in (".weight", ".weight" + SCALE, ".bias"))
                bias = None if bias is None else bias.to(torch.float32, copy=True)
                setattr(module, child_name, Int8Linear(weight, scale.clone(), bias))
    return model


def pack(model: GPT, reread: Callable[[str], torch.Tensor], file_rows: Callable[[str], object] | None = None) -> None:
    """Lay a CPU int8 model's layers out for fbgemm, each from `reread(name)`: its plain weight read again, by its
    name in the file, through a memory map of its own.

    Read through the file's one map, every weight stayed in this process's memory beside its packed copy until
    the last layer was packed: gpt2's peak RSS at load was 81 MiB higher. Through a map of its own, a weight
    leaves memory as packing drops it. The embedding then reads the tied head's rows from the file as tokens need
    them (`file_rows(name)`, a checkpoint.FileRows); without it, the head keeps its plain weight too, a copy out
    of its map. The head goes first, so that fbgemm's 37 MiB copy of it comes before the other layers' exist.
    """
    head = model.lm_head
    if not _fbgemm_ok(head.scale.device):
        return
    wte = "transformer.wte.weight"
    head.weight = reread(wte) if file_rows else reread(wte).clone()
    head.pack(keep_weight=file_rows is None)
    if file_rows:
        model.transformer.wte.file_rows = file_rows(wte)
    for name, layer in model.named_modules():
        if isinstance(layer, Int8Linear) and layer is not head:
            layer.weight = reread(f"{name}.weight")
            layer.pack()


def _int8_layer(x: torch.Tensor, packed: _Packed, col_sums: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None, reduce_range: bool) -> torch.Tensor:
    """An int8 layer, as the decode step and batched calls of Int8Linear run it: fbgemm quantizes one
    sequence itself; several are quantized one by one, so that none changes another's numbers."""
    y = (torch.ops.quantized.linear_dynamic(x, packed, reduce_range) if x.size(0) == 1
         else _fbgemm_per_sequence(x, packed, col_sums, reduce_range))
    return _rescale(y, scale, bias)


def _decode_step(tokens: list[int], positions: list[int], embedded: torch.Tensor, wpe: torch.Tensor,
                 packed: list[_Packed], col_sums: list[torch.Tensor], scales: list[torch.Tensor],
                 biases: list[torch.Tensor | None], norms: list[list[torch.Tensor | None]],
                 caches: list[list[torch.Tensor]], n_head: int, eps: float, reduce_range: bool) -> torch.Tensor:
    """GPT.forward for one new token of each sequence in cache rows 0..B-1 (tokens[b] at positions[b]; embedded[b],
    its token's embedding, as the model's embedding looks it up) over fbgemm's packed weights: the same ops in the
    same order (so the same logits, bit for bit), run by TorchScript instead of Python. Returns the logits,
    (B, vocab).

    Per layer i: packed[4i:4i+4] are c_attn, attn.c_proj, c_fc, mlp.c_proj; norms[2i], norms[2i+1] are
    ln_1, ln_2 as [weight, bias]; caches[i] is [keys and values, keys, values], views made once (fewer ops
    a token); the last packed weight and norm are the head and ln_f. Each row attends over its own keys.
    """
    B = len(tokens)
    x = (embedded + wpe[torch.tensor(positions)]).unsqueeze(1)  # (B, T=1, C)
    C = x.size(-1)
    for i, (kv, k, v) in enumerate(caches):  # kv: (2, rows, nh, max_len, hs); k, v: (rows, nh, max_len, hs)
        h = F.layer_norm(x, [C], norms[2 * i][0], norms[2 * i][1], eps)
        qkv = _int8_layer(h, packed[4 * i], col_sums[4 * i], scales[4 * i], biases[4 * i], reduce_range)
        qkv = qkv.view(B, 1, 3, n_head, C // n_head).permute(2, 0, 3, 1, 4)  # (3, B, nh, T, hs)
        q, new_kv, ys = qkv[0], qkv[1:], []
        for b, pos in enumerate(positions):  # narrow(): one op where an index with `:`s is one per dimension
            kv.narrow(1, b, 1).narrow(3, pos, 1).copy_(new_kv.narrow(1, b, 1))
            ys.append(F.scaled_dot_product_attention(q.narrow(0, b, 1), k.narrow(0, b, 1).narrow(2, 0, pos + 1),
                                                     v.narrow(0, b, 1).narrow(2, 0, pos + 1)))
        y = ys[0] if B == 1 else torch.cat(ys)
        y = y.transpose(1, 2).reshape(B, 1, C)
        x = x + _int8_layer(y, packed[4 * i + 1], col_sums[4 * i + 1], scales[4 * i + 1], biases[4 * i + 1],
                             reduce_range)
        h = F.layer_norm(x, [C], norms[2 * i + 1][0], norms[2 * i + 1][1], eps)
        h = _int8_layer(h, packed[4 * i + 2], col_sums[4 * i + 2], scales[4 * i + 2], biases[4 * i + 2],
                        reduce_range)
        h = F.gelu(h, approximate="tanh")
        x = x + _int8_layer(h, packed[4 * i + 3], col_sums[4 * i + 3], scales[4 * i + 3], biases[4 * i + 3],
                             reduce_range)
    x = F.layer_norm(x, [C], norms[-1][0], norms[-1][1], eps)
    return _int8_layer(x, packed[-1], col_sums[-1], scales[-1], biases[-1], reduce_range).view(B, -1)


@functools.cache
def _scripted_decode_step():
    """_decode_step compiled by TorchScript, or None where it cannot be (no source files, a torch without it).

    Why TorchScript: a decode step is ~400 small ops a sequence, and Python between them cost a sixth of a
    token (GPT-2's forward 4.33 -> 3.65 ms on 2 cores, measured); torch.compile cannot trace fbgemm's
    packed weights (TorchScript objects), TorchScript takes them as they are. It is deprecated in favour of
    torch.compile, hence the warning filter; gptgen pins its torch.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.script(_decode_step)
    except Exception as e:  # noqa: BLE001 - any failure here only means the slower path
        warnings.warn(f"int8 decode step not compiled ({e.__class__.__name__}); decoding runs in Python", stacklevel=2)
        return None


class Int8Decoder:
    """One new token of each sequence in cache rows 0..B-1 of an int8 GPT whose caches are set up: the logits,
    (B, vocab)."""

    def __init__(self, model: GPT, step) -> None:
        blocks = model.transformer.h
        linears = [m for b in blocks for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)]
        linears.append(model.lm_head)
        norms = [m for b in blocks for m in (b.ln_1, b.ln_2)] + [model.transformer.ln_f]
        caches = [b.attn.cache.kv for b in blocks]
        self.step, self.embedding = step, model.transformer.wte
        self.args = (model.transformer.wpe.weight,
                     [m._packed for m in linears], [m._col_sums for m in linears], [m.scale for m in linears],
                     [m.bias for m in linears], [[m.weight, m.bias] for m in norms],
                     [[kv, kv[0], kv[1]] for kv in caches], model.config.n_head, norms[0].eps,
                     model.lm_head._reduce_range)  # every layer's, chosen at pack

    def __call__(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        # Unoptimized: TorchScript's profiling runs made the first two calls 26 and 8 ms (3.5 ms after them);
        # without them every call takes the same, as fast as after the profiling (measured).
        embedded = self.embedding(torch.tensor(tokens))
        with torch.jit.optimized_execution(False):
            return self.step(tokens, positions, embedded, *self.args)


def int8_decoder(model) -> Int8Decoder | None:
    """The compiled decoding step for an int8 model packed for fbgemm (CPU) with caches set up, else None."""
    linears = [m for m in model.modules() if isinstance(m, (Int8Linear, nn.Linear))]
    if not all(isinstance(m, Int8Linear) and m._packed is not None for m in linears):
        return None
    if model.transformer.h[0].attn.cache is None or (step := _scripted_decode_step()) is None:
        return None
    return Int8Decoder(model, step)
