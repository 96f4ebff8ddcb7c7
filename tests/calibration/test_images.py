"""Image calibration: folders of images into pixels, class folders, and the statistics of a
convolution (its unfolded patches), which must give errors as exact as a linear layer's."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from svdq.algo.error import reference, relative_error
from svdq.calibration import collect, images
from svdq.errors import SvdqError
from svdq.models.layers import weight_of


class Processor:
    """Scales grey images to [0, 1] as (n, 1, 28, 28) pixel values, like a real processor."""

    def __call__(self, batch, return_tensors="pt"):
        import numpy as np

        return {"pixel_values": torch.tensor(np.stack([np.asarray(im) for im in batch]))
                .float()[:, None] / 255}


def test_calibration_pixels_are_seeded_and_fewer_images_warn(image_folder):
    a, info = images.calibration_pixels(Processor(), image_folder, 5, 0, 1)
    b, _ = images.calibration_pixels(Processor(), image_folder, 5, 0, 1)
    c, _ = images.calibration_pixels(Processor(), image_folder, 5, 1, 1)
    assert a.shape == (5, 1, 28, 28) and torch.equal(a, b) and not torch.equal(a, c)
    assert info["kind"] == "images" and info["samples"] == 5
    warned = []
    all_, info = images.calibration_pixels(Processor(), image_folder, 100, 0, 1, warned.append)
    assert len(all_) == 18 == info["samples"] and "18 images" in warned[0]


def test_bad_folders_and_images_are_refused(tmp_path, image_folder):
    with pytest.raises(SvdqError, match="holds no PNG or JPEG"):
        images.check_folder(tmp_path)
    with pytest.raises(SvdqError, match="does not exist"):
        images.check_folder(tmp_path / "missing")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(SvdqError, match="cannot read image .*broken.png"):
        images.pixels(Processor(), images.files(tmp_path), 1)
    with pytest.raises(SvdqError, match="3-channel"):
        images.pixels(lambda b, return_tensors: {"pixel_values": torch.zeros(len(b), 3, 2, 2)},
                      images.files(image_folder)[:1], 1)


def test_class_folders_by_label_or_index(tmp_path, image_folder):
    labels = {0: "shirt", 1: "shoe", 2: "bag"}
    data = images.labelled(image_folder, labels)
    assert len(data) == 18 and {y for _, y in data} == {0, 1, 2}
    assert all(p.parent.name == labels[y] for p, y in data)
    for i in (0, 2):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "x.png").write_bytes((image_folder / "shirt" / "0.png").read_bytes())
    assert sorted(y for _, y in images.labelled(tmp_path, labels)) == [0, 2]
    (tmp_path / "hat").mkdir()
    with pytest.raises(SvdqError, match="'hat' names no class"):
        images.labelled(tmp_path, labels)


@pytest.mark.parametrize("geometry", [dict(kernel_size=3, padding=1),
                                      dict(kernel_size=3, stride=2, dilation=2, padding=2),
                                      dict(kernel_size=(1, 3), padding=(0, 1))])
def test_conv_statistics_are_those_of_its_unfolded_patches(geometry, monkeypatch):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, bias=True, **geometry)
    x = [torch.randn(3, 4, 9, 11), torch.randn(2, 4, 9, 11)]
    monkeypatch.setattr(collect, "PATCHES", 500)  # several pieces per batch
    with collect.collect({"c": conv}) as stats:
        for b in x:
            conv(b)
    st = stats["c"]
    w_cols = 4 * conv.kernel_size[0] * conv.kernel_size[1]
    patches = torch.cat([nn.functional.unfold(b, conv.kernel_size, conv.dilation, conv.padding,
                                              conv.stride).transpose(1, 2).reshape(-1, w_cols)
                         for b in x]).double()
    assert st.tokens == patches.shape[0]
    gram = patches.T @ patches  # float32 partial products: agreement to float32 precision
    assert float((st.gram - gram).norm() / gram.norm()) < 1e-6
    assert float((st.total - patches.sum(0)).norm() / patches.sum(0).norm()) < 1e-6
    # the relative output error from the statistics is the error of the conv's outputs
    w = weight_of(conv).float()
    w_hat = w + 0.1 * torch.randn_like(w)
    err = relative_error(w, w_hat, st, reference(w, conv.bias.detach(), st))
    other = nn.Conv2d(4, 6, bias=True, **geometry)
    with torch.no_grad():
        other.weight.copy_(w_hat.reshape(conv.weight.shape))
        other.bias.copy_(conv.bias)
        y = torch.cat([conv(b).flatten(1) for b in x])
        y_hat = torch.cat([other(b).flatten(1) for b in x])
    assert err == pytest.approx(float((y - y_hat).norm() / y.norm()), rel=1e-4)


def test_convs_on_one_input_share_statistics_only_with_one_geometry():
    a, b, c = nn.Conv2d(4, 6, 3, padding=1), nn.Conv2d(4, 5, 3, padding=1), nn.Conv2d(4, 6, 1)
    with collect.collect({"a": a, "b": b, "c": c}) as stats:
        x = torch.randn(2, 4, 5, 5)
        a(x), b(x), c(x)
    assert stats["a"].gram is stats["b"].gram
    assert stats["c"].gram.shape == (4, 4)
