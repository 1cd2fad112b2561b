"""benchmarks/unet_train_step.py's kernel share: the profiled share of a step inside conv / GEMM / attention."""
import torch

from benchmarks.unet_train_step import TrainStep, build_ours


class ElementwiseNet(torch.nn.Module):
    """No conv, no matmul: every op of its step is element-wise."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(1))

    def forward(self, x, t, context):
        return torch.nn.functional.silu(x * self.scale)


def test_kernel_share_counts_conv_gemm_attention_and_nothing_else():
    torch.manual_seed(0)
    unet = TrainStep(build_ours(1), batch_size=2, size=8, device=torch.device("cpu"))
    unet()  # warm-up: AdamW state
    share = unet.kernel_time_share()
    assert 0.2 < share < 1.0  # most of a UNet step is its kernels, not all of it
    elementwise = TrainStep(ElementwiseNet(), batch_size=2, size=8, device=torch.device("cpu"))
    assert elementwise.kernel_time_share() == 0.0
