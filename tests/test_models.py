"""Tests for free.models: shapes, registry, generator, and torch.func compatibility (MAML inner loops)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

from free.models import (
    CLASSIFIER_ARCHS,
    MODEL_REGISTRY,
    Conv4,
    Generator,
    ResNet12,
    build_generator,
    build_model,
    feature_dim,
)

WIDTH = 8  # tiny widths keep the whole file fast on CPU
N_WAY = 5


def _make(arch: str, in_channels: int, image_size: int, **kwargs: object) -> nn.Module:
    torch.manual_seed(0)
    return build_model(arch, in_channels=in_channels, n_classes=N_WAY, image_size=image_size, width=WIDTH, **kwargs)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers, detached clones, as functional_call expects them."""
    return {k: v.detach().clone() for k, v in [*model.named_parameters(), *model.named_buffers()]}


# --------------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", CLASSIFIER_ARCHS)
@pytest.mark.parametrize(("image_size", "channels"), [(28, 1), (32, 3)])
def test_classifier_output_shape(arch: str, image_size: int, channels: int) -> None:
    model = _make(arch, channels, image_size)
    x = torch.rand(3, channels, image_size, image_size)
    assert model(x).shape == (3, N_WAY)
    feats = model.features(x)
    assert feats.shape == (3, feature_dim(model))


@pytest.mark.parametrize("arch", ["conv4", "resnet12"])
def test_classifier_output_shape_84(arch: str) -> None:
    model = _make(arch, 3, 84)
    x = torch.rand(2, 3, 84, 84)
    assert model(x).shape == (2, N_WAY)


@pytest.mark.parametrize(("image_size", "spatial"), [(28, 1), (32, 2), (84, 5)])
def test_conv4_feature_dim(image_size: int, spatial: int) -> None:
    model = Conv4(in_channels=3, n_classes=N_WAY, image_size=image_size, width=WIDTH)
    assert model.feature_dim == WIDTH * spatial * spatial


def test_resnet12_widths_scale_with_width() -> None:
    model = ResNet12(in_channels=3, n_classes=N_WAY, image_size=32, width=64)
    convs = [m.out_channels for m in model.encoder.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    assert convs == [64, 160, 320, 640]
    assert model.feature_dim == 640


@pytest.mark.parametrize("image_size", [8, 15])
def test_conv4_rejects_too_small_images(image_size: int) -> None:
    with pytest.raises(ValueError, match="image_size"):
        Conv4(in_channels=1, n_classes=N_WAY, image_size=image_size)


def test_track_running_stats_false_has_no_running_buffers() -> None:
    model = _make("conv4", 1, 28, track_running_stats=False)
    assert not any("running" in name for name, _ in model.named_buffers())


# --------------------------------------------------------------------------------------------------
# Generator
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("image_size", "channels"), [(28, 1), (32, 3)])
def test_generator_output_shape_and_range(image_size: int, channels: int) -> None:
    torch.manual_seed(0)
    gen = Generator(image_size=image_size, channels=channels, latent_dim=16)
    z = gen.sample_latent(4)
    assert z.shape == (4, 16)
    out = gen(z * 10)  # large latents push the sigmoid towards its limits
    assert out.shape == (4, channels, image_size, image_size)
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_generator_rejects_size_not_divisible_by_4() -> None:
    with pytest.raises(ValueError, match="image_size"):
        Generator(image_size=30, channels=3)


def test_generator_sample_latent_reproducible() -> None:
    gen = build_generator(image_size=32, channels=3)
    a = gen.sample_latent(3, generator=torch.Generator().manual_seed(7))
    b = gen.sample_latent(3, generator=torch.Generator().manual_seed(7))
    c = gen.sample_latent(3, generator=torch.Generator().manual_seed(8))
    assert a.shape == (3, 256)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_gradient_flows_from_classifier_loss_to_generator() -> None:
    torch.manual_seed(0)
    gen = Generator(image_size=28, channels=1, latent_dim=16)
    teacher = _make("conv4", 1, 28).eval()
    teacher.requires_grad_(False)  # inversion: the teacher is frozen, only the generator learns
    images = gen(gen.sample_latent(6))
    loss = F.cross_entropy(teacher(images), torch.arange(6) % N_WAY)
    loss.backward()
    for name, p in gen.named_parameters():
        assert p.grad is not None, name
    assert gen.fc.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------


def test_registry_builds_all_archs() -> None:
    assert CLASSIFIER_ARCHS == ("conv4", "resnet10", "resnet12", "resnet18")
    assert set(MODEL_REGISTRY) == set(CLASSIFIER_ARCHS)
    for arch in CLASSIFIER_ARCHS:
        model = build_model(arch, in_channels=3, n_classes=N_WAY, image_size=32, width=WIDTH)
        assert isinstance(model, nn.Module)
        assert model.classifier.out_features == N_WAY


def test_registry_resnet_depths_differ() -> None:
    def n_convs(arch: str) -> int:
        return sum(isinstance(m, nn.Conv2d) for m in _make(arch, 3, 32).modules())

    assert n_convs("resnet10") < n_convs("resnet18")


def test_registry_unknown_name_lists_known_names() -> None:
    with pytest.raises(ValueError, match="resnet99") as excinfo:
        build_model("resnet99", in_channels=3, n_classes=N_WAY, image_size=32)
    for arch in CLASSIFIER_ARCHS:
        assert arch in str(excinfo.value)


# --------------------------------------------------------------------------------------------------
# torch.func compatibility
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", CLASSIFIER_ARCHS)
def test_functional_call_matches_forward(arch: str) -> None:
    model = _make(arch, 3, 32).eval()
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(functional_call(model, _state(model), (x,)), model(x))


@pytest.mark.parametrize("arch", ["conv4", "resnet12"])
def test_functional_call_with_modified_params_matches_loaded_copy(arch: str) -> None:
    model = _make(arch, 3, 32)
    x = torch.rand(4, 3, 32, 32)
    y = torch.arange(4) % N_WAY

    # One manual SGD step (train mode, as in an inner loop) to get weights different from the module's.
    names = [n for n, _ in model.named_parameters()]
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    state = _state(model)
    for n, g in zip(names, grads, strict=True):
        state[n] = state[n] - 0.5 * g

    model.eval()
    reference = copy.deepcopy(model)
    reference.load_state_dict(state)
    expected = reference(x)
    torch.testing.assert_close(functional_call(model, state, (x,)), expected)
    # Guard: the step must have changed the output, otherwise the comparison proves nothing.
    assert not torch.allclose(model(x), expected)


@pytest.mark.parametrize("track_running_stats", [True, False])
def test_maml_inner_step_torch_func_matches_autograd(track_running_stats: bool) -> None:
    # train mode: BN normalises with batch statistics, as in MAML
    model = _make("conv4", 1, 28, track_running_stats=track_running_stats)
    x = torch.rand(N_WAY * 2, 1, 28, 28)
    y = torch.arange(N_WAY * 2) % N_WAY
    lr = 0.4

    # Explicit loop on a copied module with torch.autograd.grad.
    clone = copy.deepcopy(model)
    loss = F.cross_entropy(clone(x), y)
    grads = torch.autograd.grad(loss, list(clone.parameters()))
    expected = {n: p.detach() - lr * g for (n, p), g in zip(clone.named_parameters(), grads, strict=True)}

    # Functional version via torch.func.grad over functional_call. The buffers are an explicit argument
    # (not captured by the closure): BN updates its running stats in place, which torch.func only
    # allows on inputs of the transformed function.
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}

    def loss_fn(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, (p, b), (x,)), y)

    func_grads = grad(loss_fn)(params, buffers)
    adapted = {n: params[n] - lr * func_grads[n] for n in params}

    assert adapted.keys() == expected.keys()
    for n, want in expected.items():
        torch.testing.assert_close(adapted[n], want, msg=f"parameter {n}")
    # Running statistics are updated identically by both paths.
    for n, b in clone.named_buffers():
        torch.testing.assert_close(buffers[n], b, msg=f"buffer {n}")
    # Guard: the inner step must actually move the weights.
    assert not torch.allclose(adapted["classifier.weight"], params["classifier.weight"])
    # functional_call must not touch the module's own parameters.
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), params[n])
