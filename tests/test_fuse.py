"""The inference copy of a network computes what the network computes, with fewer operations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from embedsearch.encoders.nn.fuse import SubPixelDeconv, for_inference
from embedsearch.encoders.nn.models import ModelConfig, build_model


def _with_statistics(config: ModelConfig, seed: int = 0) -> nn.Module:
    """A model whose batch norms have non-trivial running statistics and affine parameters."""
    model = build_model(config, seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, nn.BatchNorm2d):
                n = layer.num_features
                layer.running_mean.copy_(torch.randn(n, generator=gen))
                layer.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                layer.weight.copy_(torch.randn(n, generator=gen))
                layer.bias.copy_(torch.randn(n, generator=gen))
    return model.eval()


CONFIGS = [
    ModelConfig("conv", 28, 1, 8, False),
    ModelConfig("conv", 28, 1, 8, True),
    ModelConfig("conv", 32, 3, 16, True),
    ModelConfig("conv", 64, 3, 16, False),  # a third stride-2 stage
    ModelConfig("mlp", 28, 1, 8, True),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.arch}-{c.image_size}x{c.channels}-vae{c.variational}")
def test_the_inference_copy_gives_the_same_codes_and_images(config: ModelConfig) -> None:
    model = _with_statistics(config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = for_inference(model)
    gen = torch.Generator().manual_seed(1)
    size = config.image_size
    x = torch.rand(6, size, size, config.channels, generator=gen).permute(0, 3, 1, 2)  # channels-last, as encoded
    with torch.inference_mode():
        z, z_fast = model.encode(x), fast.encode(x)
        torch.testing.assert_close(z_fast, z, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fast.decode_logits(z), model.decode_logits(z), rtol=1e-4, atol=1e-4)
        code, loss = model.novelty(x, "bernoulli")
        code_fast, loss_fast = fast.novelty(x, "bernoulli")
        torch.testing.assert_close(code_fast, code, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(loss_fast, loss, rtol=1e-5, atol=1e-3)
        assert not torch.equal(z[0], z[1])  # a real input, not a constant
    # The trained and saved network is left as it was.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    if config.arch == "conv":
        assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
        assert isinstance(list(fast.decoder.net)[-1], SubPixelDeconv)


def test_the_sub_pixel_form_equals_the_transposed_convolution() -> None:
    gen = torch.Generator().manual_seed(2)
    deconv = nn.ConvTranspose2d(5, 3, 3, stride=2, padding=1, output_padding=1)
    x = torch.randn(4, 5, 7, 7, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(SubPixelDeconv(deconv)(x), deconv(x), rtol=1e-5, atol=1e-5)


def test_threads_that_ask_at_once_share_one_inference_copy_and_the_encoder_still_pickles() -> None:
    import pickle
    import threading

    from embedsearch.data.images import InputSpec
    from embedsearch.encoders.nn.encoder import VAEEncoder
    from embedsearch.encoders.nn.train import VAEOptions

    config = ModelConfig("conv", 28, 1, 8, True)
    encoder = VAEEncoder(InputSpec(28, 1), 8, VAEOptions(latent_dim=8), model=_with_statistics(config))
    start, seen = threading.Barrier(4), []

    def ask() -> None:
        start.wait()
        seen.append(encoder.runtime)

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(seen) == 4 and all(copy is seen[0] for copy in seen)
    again = pickle.loads(pickle.dumps(encoder))  # what Ray does to ship it to its workers
    x = torch.rand(2, 28, 28, 1, generator=torch.Generator().manual_seed(0)).mul(255).to(torch.uint8).numpy()
    assert (again.encode(x) == encoder.encode(x)).all()
