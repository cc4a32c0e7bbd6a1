"""int8 weights: symmetric, per output channel, for every linear layer and the tied embedding/head.

The file stores int8 tensors and float32 per-row scales; in memory they stay int8. On CPU the
matmuls run in fbgemm's dynamic int8 linear (activations quantized per call, int8 x int8 -> int32 on
VNNI), packed once at load; elsewhere the int8 weight is converted one layer at a time, per call.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptgen.model import GPT

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


class Int8Linear(nn.Module):
    """y = x W^T + b with W held as int8 rows and their scales (the bias stays float)."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)
        self._packed = None

    def pack(self, keep_weight: bool = False) -> None:
        """Lay the weight out for fbgemm once, at load. fbgemm keeps its own int8 copy, so the plain one is
        dropped (and rebuilt on demand) unless something else reads it: the tied embedding does."""
        if self._packed is not None or not _fbgemm_ok(self.scale.device):
            return
        with warnings.catch_warnings():  # quantized tensors are deprecated as a user type; fbgemm's ops are not
            warnings.simplefilter("ignore", UserWarning)
            q = torch._make_per_channel_quantized_tensor(self.weight, self.scale.double(),
                                                         torch.zeros_like(self.scale, dtype=torch.long), 0)
        self._packed = torch.ops.quantized.linear_prepack(q, self.bias.float() if self.bias is not None else None)
        if not keep_weight:
            self.weight = None

    def int8_weight(self) -> torch.Tensor:
        if self.weight is not None:
            return self.weight
        return torch.ops.quantized.linear_unpack(self._packed)[0].int_repr()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is not None and x.device.type == "cpu":
            return torch.ops.quantized.linear_dynamic(x.float().contiguous(), self._packed)
        # Scale the output, not the weight: N multiplies instead of N x K, and the form inductor fuses into
        # one int8-weight matmul when the model is compiled (as gpt-fast does on GPUs).
        y = F.linear(x, self.int8_weight().to(x.dtype)) * self.scale.to(x.dtype)
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

    @property
    def weight(self) -> torch.Tensor:
        return self.head[0].weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        head = self.head[0]
        return head.weight[idx].float() * head.scale[idx, None]


def quantize_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A float model's weights -> the int8 file's tensors: every 2-D weight but the position embedding."""
    out = {}
    for name, t in state.items():
        if is_quantized(name, tuple(t.shape)):
            out[name], out[name + SCALE] = quantize_rows(t)
        else:
            out[name] = t
    return out


def int8_model(config, tensors: dict[str, torch.Tensor]) -> GPT:
    """A GPT whose linear layers and tied embedding/head are int8 modules over the file's tensors.

    The tied pair: lm_head is one Int8Linear over `transformer.wte.weight` and its scales, and the
    embedding looks rows up in that same module, so the int8 tensor exists once in memory.
    """
    with torch.device("meta"):
        model = GPT(config)
    # Tensors that stay for the model's life are copied out of the file's memory map, so the map (and the
    # int8 weights fbgemm repacks) can be released once packing is done.
    float_tensors = {k: v.clone() for k, v in tensors.items() if v.dtype != torch.int8 and not k.endswith(SCALE)}
    model.load_state_dict(float_tensors, strict=False, assign=True)
    wte = "transformer.wte.weight"
    head = Int8Linear(tensors[wte].clone(), tensors[wte + SCALE].clone(), None)
    model.lm_head = head
    model.transformer.wte = Int8Embedding(head)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child is not head:
                key = f"{name}.{child_name}" if name else child_name
                weight, scale, bias = (tensors.get(key + suffix) for suffix in (".weight", ".weight" + SCALE, ".bias"))
                setattr(module, child_name, Int8Linear(weight, scale.clone(), None if bias is None else bias.clone()))
    return model
