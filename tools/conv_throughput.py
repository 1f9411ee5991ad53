#!/usr/bin/env python
"""How fast this CPU runs YOLACT's largest convolutions in fp32: PyTorch vs onnxruntime, and a
Winograd F(2x2, 3x3) rewrite in plain ONNX ops (the experiment behind the README's "Deploy" speed notes).

    python tools/conv_throughput.py --threads 2

Prints, per 3x3 convolution shape of the R-50 550 model (protonet, FPN, head, ResNet stages), the
median time of PyTorch (NCHW and channels-last), onnxruntime's Conv and the Winograd graph in
onnxruntime, with GFLOP/s (2 x multiply-adds of the direct convolution per second).
"""
import argparse
import io
import time

import numpy as np
import torch
import torch.nn.functional as F

# (in channels, out channels, height = width) of stride-1 3x3 convs in YOLACT R-50 at 550.
SHAPES = [(256, 256, 138), (256, 256, 69), (256, 256, 35), (256, 243, 69), (128, 128, 69), (64, 64, 138)]
# Winograd F(2x2, 3x3) (Lavin and Gray, 2016): Y = A^T [(G g G^T) * (B^T d B)] A.
B_T = torch.tensor([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=torch.float64)
G = torch.tensor([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=torch.float64)


class WinogradConv(torch.nn.Module):
    """A 3x3, stride 1, padding 1 conv as Winograd F(2x2, 3x3) in ops that export to ONNX."""

    def __init__(self, conv: torch.nn.Conv2d):
        super().__init__()
        w = conv.weight.detach().double()  # (K, C, 3, 3)
        u = torch.einsum("ar,kcrs,bs->abkc", G, w, G)  # (4, 4, K, C)
        self.register_buffer("u", u.reshape(16, w.shape[0], w.shape[1]).float())
        self.register_buffer("bias", conv.bias.detach().reshape(1, -1, 1, 1).clone())

    def forward(self, x):
        _, c, h, w = x.shape
        th, tw = (h + 1) // 2, (w + 1) // 2  # 2x2 output tiles
        xp = F.pad(x, (1, 1 + 2 * tw - w, 1, 1 + 2 * th - h))
        r = [xp[:, :, i:i + 2 * th:2] for i in range(4)]  # row i of every 4x4 input tile
        v = []
        for t in (r[0] - r[2], r[1] + r[2], r[2] - r[1], r[1] - r[3]):  # B^T d
            q = [t[..., j:j + 2 * tw:2] for j in range(4)]
            v += [q[0] - q[2], q[1] + q[2], q[2] - q[1], q[1] - q[3]]  # (B^T d) B
        m = torch.matmul(self.u, torch.stack(v).reshape(16, c, th * tw)).reshape(4, 4, -1, th * tw)
        m = torch.stack([m[0] + m[1] + m[2], m[1] - m[2] - m[3]])  # A^T M
        m = torch.stack([m[:, 0] + m[:, 1] + m[:, 2], m[:, 1] - m[:, 2] - m[:, 3]], 1)  # (A^T M) A
        k = m.shape[2]
        y = m.reshape(2, 2, k, th, tw).permute(2, 3, 0, 4, 1).reshape(1, k, 2 * th, 2 * tw)
        return y[:, :, :h, :w] + self.bias


def median_ms(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def ort_session(module, x, threads):
    import onnxruntime as ort

    buffer = io.BytesIO()
    torch.onnx.export(module, (x,), buffer, dynamo=False, opset_version=17)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    return lambda: session.run(None, feed)[0]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=7)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"{'conv (C->K @ HxW)':<22}{'torch NCHW':>16}{'torch NHWC':>16}{'onnxruntime':>16}{'winograd (ort)':>18}  rel. error")
    for c, k, hw in SHAPES:
        conv = torch.nn.Conv2d(c, k, 3, padding=1).eval()
        x = torch.randn(1, c, hw, hw)
        gflop = 2 * c * k * 9 * hw * hw / 1e9
        with torch.no_grad():
            cl = torch.nn.Conv2d(c, k, 3, padding=1).eval().to(memory_format=torch.channels_last)
            cl.load_state_dict(conv.state_dict())
            xl = x.to(memory_format=torch.channels_last)
            times = [median_ms(lambda: conv(x), args.repeat), median_ms(lambda: cl(xl), args.repeat)]
            direct, wino = ort_session(conv, x, args.threads), ort_session(WinogradConv(conv).eval(), x, args.threads)
            times += [median_ms(direct, args.repeat), median_ms(wino, args.repeat)]
            ref = conv(x).numpy()
        err = np.linalg.norm(wino() - ref) / np.linalg.norm(ref)
        cells = "".join(f"{t:>9.1f} ms {gflop / t * 1e3:>3.0f}" for t in times[:3])
        print(f"{f'{c}->{k} @ {hw}x{hw}':<22}{cells}{times[3]:>11.1f} ms {gflop / times[3] * 1e3:>3.0f}  {err:.1e}")
    print("GFLOP/s after each time: 2 x multiply-adds of the direct convolution per second")


if __name__ == "__main__":
    main()
