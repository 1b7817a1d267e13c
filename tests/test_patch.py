import pytest
import torch
from reference import reference_merge
from torch import nn

from turbo_export import TurboExportError, apply_turbo, remove_turbo
from turbo_export.families import get_family

PRESETS = {
    "ViTForImageClassification": "tiny",
    "DeiTForImageClassificationWithTeacher": "tiny-deit",
    "Dinov2Model": "tiny-dinov2",
}


def _output(model, pixels):
    out = model(pixel_values=pixels)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


def _models():
    import transformers

    built = []
    for preset in PRESETS.values():
        built.append(get_family("vit").load(f"random:{preset}").model)
    cfg = get_family("vit").load("random:tiny").model.config
    for cls in ("ViTModel", "DeiTModel", "DeiTForImageClassification"):
        config = getattr(transformers, cls.replace("Model", "Config").replace("ForImageClassification", "Config"))(
            **{k: getattr(cfg, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                            "intermediate_size", "image_size", "patch_size")})
        torch.manual_seed(0)
        built.append(getattr(transformers, cls)(config).eval())
    return built


@pytest.mark.parametrize("model", _models(), ids=lambda m: type(m).__name__)
def test_remove_turbo_restores_bit_for_bit(model):
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = _output(model, pixels)
        apply_turbo(model, 8, alpha=6.0)
        merged = _output(model, pixels)
        remove_turbo(model)
        after = _output(model, pixels)
    assert torch.equal(before, after)
    assert not torch.equal(merged, before) if merged.shape == before.shape else merged.shape != before.shape
    assert "_turbo" not in model.__dict__


@pytest.mark.parametrize("model", _models(), ids=lambda m: type(m).__name__)
def test_ratio_zero_is_the_original_model(model):
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = _output(model, pixels)
        apply_turbo(model, 0)
        torch.testing.assert_close(_output(model, pixels), before, rtol=1e-5, atol=1e-5)
    remove_turbo(model)


def _reference_vit_forward(model, pixels, r, alpha, prop_attn=True):
    """The Turbo ViT forward written out by hand from the specification, merging with the loop reference."""
    vit = model.vit
    x = vit.embeddings(pixels)
    size = torch.ones(x.shape[0], x.shape[1], 1)
    merged_once = False
    for block in vit.layers:
        attn = block.attention
        h = block.layernorm_before(x)
        b, n, _ = h.shape
        q = attn.q_proj(h).view(b, n, attn.num_attention_heads, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(h).view(b, n, attn.num_attention_heads, attn.head_dim).transpose(1, 2)
        v = attn.v_proj(h).view(b, n, attn.num_attention_heads, attn.head_dim).transpose(1, 2)
        logits = q @ k.transpose(-1, -2) / attn.head_dim ** 0.5
        if prop_attn and merged_once:
            logits = logits + size.log().view(b, 1, 1, n)
        probs = logits.softmax(-1)
        x = x + attn.o_proj((probs @ v).transpose(1, 2).reshape(b, n, -1))
        r_l = min(r, (n - 1) // 2)
        metric = k.mean(dim=1)
        semantic = probs[:, :, 0, :].mean(dim=1)
        x, size, _ = reference_merge(x, size, metric, semantic, r_l, alpha, protected=1)
        merged_once = True
        x = x + block.mlp(block.layernorm_after(x))
    return model.classifier(vit.layernorm(x)[:, 0])


@pytest.mark.parametrize("alpha", [0.0, 6.0, 150.0])
def test_patched_vit_matches_handwritten_turbo_forward(alpha):
    model = get_family("vit").load("random:tiny").model
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = _reference_vit_forward(model, pixels, 8, alpha)
        apply_turbo(model, 8, alpha=alpha)
        got = model(pixel_values=pixels).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_min_tokens_and_schedule_shapes():
    model = get_family("vit").load("random:tiny-dinov2").model
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        apply_turbo(model, 8, min_tokens=50)
        assert model(pixel_values=pixels).last_hidden_state.shape[1] == 65 - 8 - 8  # 65 -> 57 -> 49, then stop
        apply_turbo(model, [10, 0, 5])
        assert model(pixel_values=pixels).last_hidden_state.shape[1] == 65 - 15
        apply_turbo(model, (8, -0.5))  # decreasing: 12, 9, 6, 4
        assert model(pixel_values=pixels).last_hidden_state.shape[1] == 65 - (12 + 9 + 6 + 4)


def test_deit_keeps_distillation_token():
    model = get_family("vit").load("random:tiny-deit").model
    pixels = torch.randn(2, 3, 32, 32)
    apply_turbo(model, 16)
    model._turbo.record_plans = True
    with torch.no_grad():
        model(pixel_values=pixels)
    for plan in model._turbo.plans:
        assert (plan.src_idx > 0).all()  # CLS (A index 0) never a source
        assert (plan.dst_idx > 0).all()  # distillation token (B index 0) never a destination


def test_unsupported_model_is_a_clear_error():
    with pytest.raises(TurboExportError, match="supported classes: .*ViTModel"):
        apply_turbo(nn.Linear(2, 2), 4)


def test_copy_for_patching_shares_weights_and_leaves_the_original_alone():
    """The Turbo model of an export is a copy of the baseline's modules over the same weights (a full deepcopy
    doubled the memory: 2 x 10 GB for SDXL's UNet). Patching the copy must not change what the original computes."""
    from turbo_export.patch import copy_for_patching, turbo_settings

    model = get_family("vit").load("random:tiny").model.eval()
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(pixel_values=pixels).logits
    turbo = apply_turbo(copy_for_patching(model), 4)
    assert all(p is q for p, q in zip(model.parameters(), turbo.parameters()))
    assert turbo_settings(model) is None and turbo_settings(turbo) is not None
    with torch.no_grad():
        assert torch.equal(model(pixel_values=pixels).logits, before)
        assert not torch.equal(turbo(pixel_values=pixels).logits, before)
