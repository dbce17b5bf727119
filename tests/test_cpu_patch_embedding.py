"""The CPU engine's patch embedding as one GEMM over reshaped patches (engine.embed_patches with
the weight packed by pack_patch_embedding) against the float64 convolution, per dtype, on odd
shapes: odd channel counts and image sizes that leave a remainder the convolution drops."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from dcvit_engine.dtypes import cpu_has_native_bf16
from dcvit_engine.engine import build_engine, embed_patches
from dcvit_engine.reference import ViTReference
from numerics import assert_close_to_reference
from test_engine import compressed_spec, randomize

DTYPES = [torch.float32] + ([torch.bfloat16] if cpu_has_native_bf16() else [])


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("img_size,patch,chans,batch", [((40, 32), 8, 3, 1), ((45, 37), 7, 5, 3),
                                                         ((17, 30), 4, 1, 2)])
def test_patch_gemm_matches_the_float64_convolution(img_size, patch, chans, batch, dtype):
    spec = dataclasses.replace(compressed_spec(), img_size=img_size, patch_size=patch, in_chans=chans)
    torch.manual_seed(patch * 31 + chans)
    reference = randomize(ViTReference(spec))
    engine = build_engine(reference, backend="cpu", dtype=dtype)
    assert engine.patch_packed is not None, "the CPU engine should run the patch GEMM"
    images = torch.randn(batch, chans, *img_size, dtype=torch.float64)
    weight, bias = (reference.state_dict()[f"patch_embed.proj.{k}"].double() for k in ("weight", "bias"))

    def conv(x, w, b):
        return F.conv2d(x, w, b, stride=patch).flatten(2).transpose(1, 2)

    with torch.no_grad():
        out = embed_patches(engine, images.to(dtype))
        ref64 = conv(images, weight, bias)
        same = conv(images.to(dtype), weight.to(dtype), bias.to(dtype))
    assert out.shape == ref64.shape and out.dtype == dtype
    assert_close_to_reference(out, ref64, same, what=f"patch GEMM {dtype}")
    with torch.no_grad():  # and the whole engine still agrees with its convolution
        conv_engine = build_engine(reference, backend="cpu", dtype=dtype)
        conv_engine.patch_packed = None
        torch.testing.assert_close(engine(images.to(dtype)), conv_engine(images.to(dtype)),
                                   **({"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {}))
