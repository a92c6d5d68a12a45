"""HED edge detector: loads ControlNetHED.pth in its official key layout (fp16 state dict, written here by the test)
and computes what the official code (α repo diffusion/model/hed.py, lllyasviel's ControlNetHED_Apache2) computes."""

import pytest
import torch
import torch.nn.functional as F

from pixart_core.errors import PixArtError
from pixart_core.loading.hed_files import load_hed

# ControlNetHED_Apache2: (stage, in channels, out channels, convs)
STAGES = [(1, 3, 64, 2), (2, 64, 128, 2), (3, 128, 256, 3), (4, 256, 512, 3), (5, 512, 512, 3)]


def official_state_dict(seed=0):
    """Random weights under the exact key names of ControlNetHED.pth, fp16 as released."""
    g = torch.Generator().manual_seed(seed)
    sd = {"norm": torch.randn(1, 3, 1, 1, generator=g) * 50 + 120}
    for b, cin, cout, n in STAGES:
        for j in range(n):
            c = cin if j == 0 else cout
            sd[f"block{b}.convs.{j}.weight"] = torch.randn(cout, c, 3, 3, generator=g) * (2.0 / (9 * c)) ** 0.5
            sd[f"block{b}.convs.{j}.bias"] = torch.randn(cout, generator=g) * 0.01
        sd[f"block{b}.projection.weight"] = torch.randn(1, cout, 1, 1, generator=g) * (1.0 / cout) ** 0.5
        sd[f"block{b}.projection.bias"] = torch.randn(1, generator=g) * 0.1
    return {k: v.half() for k, v in sd.items()}


def official_forward(sd, image, dtype=torch.float32):
    """The official computation, transcribed: model(image*255), resize each side map to HxW, mean, sigmoid, clip."""
    sd = {k: v.to(dtype) for k, v in sd.items()}
    h = image.to(dtype) * 255.0 - sd["norm"]
    projections = []
    for b, _, _, n in STAGES:
        if b > 1:
            h = F.max_pool2d(h, kernel_size=(2, 2), stride=(2, 2))
        for j in range(n):
            h = F.relu(F.conv2d(h, sd[f"block{b}.convs.{j}.weight"], sd[f"block{b}.convs.{j}.bias"], padding=1))
        projections.append(F.conv2d(h, sd[f"block{b}.projection.weight"], sd[f"block{b}.projection.bias"]))
    H, W = image.shape[-2:]
    edges = torch.cat([F.interpolate(e, size=(H, W), mode="bilinear", align_corners=False) for e in projections], 1)
    return (1 / (1 + torch.exp(-torch.mean(edges, dim=1, keepdim=True)))).clip(0, 1)


pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")


def test_loads_official_layout_and_matches_the_official_computation(tmp_path):
    sd = official_state_dict()
    torch.save(sd, tmp_path / "ControlNetHED.pth")
    hed = load_hed(tmp_path / "ControlNetHED.pth")
    assert hed.net.norm.dtype == torch.float32
    image = torch.rand(2, 3, 37, 53, generator=torch.Generator().manual_seed(1))
    edge = hed(image)
    assert edge.shape == (2, 1, 37, 53) and edge.min() >= 0 and edge.max() <= 1
    # Both sides compute in fp32 from the same fp16-stored weights, through 13 convolutions of fan-in up to 4608 on
    # inputs scaled by 255: their rounding error depends on the CPU's convolution kernels (about 1e-5 here). So the
    # bound is the official code's own fp32 error against exact (float64) arithmetic on this machine, with room for
    # a different summation order (measured: ours 0.72x the official's error on an AMD EPYC).
    exact = official_forward(sd, image, torch.float64)
    official_error = (official_forward(sd, image) - exact).abs().max()
    assert (edge - exact).abs().max() <= 3 * official_error
    assert edge.std() > 1e-3  # not a constant map
    # ComfyUI's channels-last IMAGE gives the same map
    assert torch.allclose(hed(image.permute(0, 2, 3, 1)), edge, atol=1e-6)


def _edge_detecting_weights():
    """Weights in the official layout that make stage 1 a |Laplacian| detector and silence stages 2-5."""
    sd = {k: torch.zeros_like(v) for k, v in official_state_dict().items()}
    lap = torch.tensor([[0.0, -1.0, 0.0], [-1.0, 4.0, -1.0], [0.0, -1.0, 0.0]]) / 3
    sd["block1.convs.0.weight"][0] = lap  # every input channel, summed: Laplacian of the grey level
    sd["block1.convs.0.weight"][1] = -lap
    sd["block1.convs.1.weight"][0, 0, 1, 1] = 1.0  # |Laplacian| = relu(lap) + relu(-lap)
    sd["block1.convs.1.weight"][0, 1, 1, 1] = 1.0
    sd["block1.projection.weight"][0, 0] = 30.0 / 255.0
    sd["block1.projection.bias"][0] = -15.0
    return {k: v.half() for k, v in sd.items()}


def test_white_square_gives_edges_on_its_border(tmp_path):
    torch.save(_edge_detecting_weights(), tmp_path / "ControlNetHED.pth")
    hed = load_hed(tmp_path / "ControlNetHED.pth")
    image = torch.zeros(1, 32, 32, 3)  # ComfyUI layout: a white square on black
    image[:, 8:24, 8:24] = 1.0
    edge = hed(image)[0, 0]
    assert edge.shape == (32, 32)
    border = torch.zeros(32, 32, dtype=torch.bool)
    border[7:25, 7:25] = True
    border[9:23, 9:23] = False  # the rings just outside and just inside the square's edge
    assert edge[8, 8:24].min() > 0.9 and edge[15, 7] > 0.9 and edge[23, 15] > 0.9
    assert edge[12:20, 12:20].max() < 0.1 and edge[:4, :4].max() < 0.1
    assert edge[border].mean() > 0.8 and edge[~border].mean() < 0.1


def test_wrong_files_are_refused(tmp_path):
    sd = official_state_dict()
    bad = dict(sd)
    del bad["block5.projection.bias"]
    torch.save(bad, tmp_path / "partial.pth")
    with pytest.raises(PixArtError, match="missing"):
        load_hed(tmp_path / "partial.pth")
    torch.save({"moduleVggOne.0.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "network-bsds500.pth")
    with pytest.raises(PixArtError, match="ControlNetHED.pth"):
        load_hed(tmp_path / "network-bsds500.pth")
    wrong = dict(sd)
    wrong["norm"] = torch.zeros(1, 4, 1, 1).half()
    torch.save({"state_dict": wrong}, tmp_path / "wrong_shape.pth")
    with pytest.raises(PixArtError, match="shape"):
        load_hed(tmp_path / "wrong_shape.pth")
    torch.save(sd, tmp_path / "ControlNetHED.pth")
    with pytest.raises(PixArtError, match="colour channels"):
        load_hed(tmp_path / "ControlNetHED.pth")(torch.rand(1, 5, 8, 9))
