"""Reference of the demo op `sigmoid_gate`: the elementwise op that proves the machinery end to end."""
import torch


def sigmoid_gate(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """out = x * sigmoid(gate), computed in fp32 and rounded once to x.dtype.

    x, gate: the same shape (any, including zero elements) and dtype (bf16, fp16 or fp32).
    Returns a new tensor of x's shape and dtype. sigmoid(-inf) = 0 and sigmoid(+inf) = 1; NaN propagates.
    """
    return (x.float() * torch.sigmoid(gate.float())).to(x.dtype)
