"""CLIP and SigLIP image towers: r = 0 is transformers' model bit for bit, remove_turbo restores it, the exported
graphs match PyTorch through the CLI, the no-CLS semantic value and the pooling head's size bias, bad input."""

import json
import os

import pytest
import torch
import transformers
from click.testing import CliRunner

from turbo_export import TurboExportError, apply_turbo, remove_turbo
from turbo_export.cli import main
from turbo_export.core import merge
from turbo_export.families import get_family
from turbo_export.families.base import image_encoder_for
from turbo_export.models.presets import build_seeded
from turbo_export.patch.clip import attention_pool

VISION = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=32,
              patch_size=4)
TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=64,
            max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
CLASSES = ("CLIPVisionModel", "CLIPVisionModelWithProjection", "CLIPModel", "SiglipVisionModel", "SiglipModel")

# a folder of images in the repository: the builtin sets need the optional [data] packages, which CI does not install
DIGITS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "mnist")


def _model(cls):
    if cls == "CLIPModel":
        config = transformers.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=16)
    elif cls == "SiglipModel":
        config = transformers.SiglipConfig(text_config=TEXT, vision_config=VISION)
    elif cls.startswith("CLIP"):
        config = transformers.CLIPVisionConfig(projection_dim=16, **VISION)
    else:
        config = transformers.SiglipVisionConfig(**VISION)
    return build_seeded(cls, config)


def _outputs(model, pixels):
    """What transformers computes for the image: the tower's outputs (+ the projected embedding for CLIP)."""
    if isinstance(model, (transformers.CLIPModel, transformers.SiglipModel)):
        out = model.vision_model(pixel_values=pixels)
        found = {"last_hidden_state": out.last_hidden_state, "pooler_output": out.pooler_output}
        if isinstance(model, transformers.CLIPModel):
            found["image_embeds"] = model.get_image_features(pixel_values=pixels).pooler_output
        return found
    out = model(pixel_values=pixels)
    return {k: out[k] for k in ("last_hidden_state", "pooler_output", "image_embeds") if k in out}


@pytest.mark.parametrize("cls", CLASSES)
def test_ratio_zero_is_transformers_and_remove_turbo_restores_it(cls):
    model = _model(cls)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = _outputs(model, pixels)
        apply_turbo(model, 0)
        at_zero = _outputs(model, pixels)
        apply_turbo(model, 8)
        merged = _outputs(model, pixels)
        remove_turbo(model)
        after = _outputs(model, pixels)
    assert set(before) == set(at_zero) == set(after) and len(before) >= 2
    for name in before:
        assert torch.equal(before[name], at_zero[name]), name
        assert torch.equal(before[name], after[name]), name
    assert merged["last_hidden_state"].shape[1] == before["last_hidden_state"].shape[1] - 4 * 8
    assert "_turbo" not in model.__dict__


@pytest.mark.parametrize("preset, tokens, outputs", [
    ("tiny-clip", 65, ["last_hidden_state", "pooler_output", "image_embeds"]),
    ("tiny-siglip", 64, ["last_hidden_state", "pooler_output"]),
])
def test_cli_exports_match_pytorch(tmp_path, preset, tokens, outputs):
    out = tmp_path / preset
    result = CliRunner().invoke(main, ["vit", "--model", f"random:{preset}", "--ratio", "4", "--batch", "2",
                                       "--no-bench", "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output + result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["family"] == "clip" and report["alpha"] == 6.0
    assert report["tokens_per_layer"]["turbo"] == [tokens - 4 * i for i in range(4)]
    assert report["protected"] == (1 if preset == "tiny-clip" else 0)
    assert report["semantic"] == ("cls" if preset == "tiny-clip" else "mean-query")
    assert report["parity"]["max_abs_diff"] < 1e-4 and report["parity_baseline"]["max_abs_diff"] < 1e-4
    assert report["flops"]["baseline"] > report["flops"]["turbo"]
    import onnx

    assert [o.name for o in onnx.load(str(out / "turbo.onnx"), load_external_data=False).graph.output] == outputs
    result = CliRunner().invoke(main, ["validate", str(out), "--data", DIGITS, "--limit", "3"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output + result.stderr
    assert "CLS cosine turbo vs baseline" in result.output and "0/3 images beyond atol" in result.output


def test_received_attention_is_a_distribution_weighted_by_query_size():
    probs = torch.rand(2, 3, 5, 5).softmax(dim=-1)
    plain = merge.received_attention(probs)
    assert plain.shape == (2, 5) and (plain >= 0).all()
    torch.testing.assert_close(plain.sum(dim=-1), torch.ones(2))
    torch.testing.assert_close(plain, probs.mean(dim=1).mean(dim=1))
    # a query of size s counts as s queries: the same as repeating its row s times
    size = torch.tensor([[1.0, 3.0, 1.0, 2.0, 1.0], [2.0, 1.0, 1.0, 1.0, 4.0]]).unsqueeze(-1)
    weighted = merge.received_attention(probs, size)
    torch.testing.assert_close(weighted.sum(dim=-1), torch.ones(2))
    for b in range(2):
        rows = probs[b].repeat_interleave(size[b, :, 0].long(), dim=1)  # [H, sum(size), N]
        torch.testing.assert_close(weighted[b], rows.mean(dim=(0, 1)))
    assert torch.equal(merge.semantic_value(probs, "cls"), probs[:, :, 0, :].mean(dim=1))
    with pytest.raises(ValueError, match="received"):
        merge.semantic_value(probs, "nope")


def test_mean_query_attention_is_the_row_of_the_size_weighted_mean_query():
    gen = torch.Generator().manual_seed(5)
    q, k = torch.randn(2, 3, 6, 4, generator=gen), torch.randn(2, 3, 6, 4, generator=gen)
    size = torch.tensor([[1.0, 2.0, 1.0, 3.0, 1.0, 1.0], [1.0] * 6]).unsqueeze(-1)
    bias = merge.proportional_attention_bias(size)
    row = merge.mean_query_attention(q, k, 0.5, bias, size)
    assert row.shape == (2, 6) and (row > 0).all()
    torch.testing.assert_close(row.sum(dim=-1), torch.ones(2))
    # the softmax of the size-weighted mean log attention (a geometric mean of the rows)
    log_probs = ((q @ k.transpose(2, 3)) * 0.5 + bias).log_softmax(dim=-1)  # [B, H, N, N]
    weight = (size / size.sum(dim=1, keepdim=True))[:, None]
    expected = (log_probs * weight).sum(dim=2).softmax(dim=-1).mean(dim=1)
    torch.testing.assert_close(row, expected)
    probs = log_probs.exp()
    assert torch.equal(merge.semantic_value(probs, "mean-query", size, q, k, 0.5, bias), row)


def test_siglip_merges_with_no_cls_semantic_value_and_no_protected_token():
    model = get_family("clip").load("random:tiny-siglip").model
    apply_turbo(model, 8)
    assert model._turbo.semantic == "mean-query" and model._turbo.protected == 0
    model._turbo.record_plans = True
    with torch.no_grad():
        out = model(pixel_values=torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)))
    assert out.last_hidden_state.shape[1] == 64 - 4 * 8 and out.pooler_output.shape == (2, 32)
    assert out.token_sizes.sum(dim=1).flatten().tolist() == [64.0, 64.0]
    assert len(model._turbo.plans) == 4 and all(p.src_idx.shape[1] == 8 for p in model._turbo.plans)
    with pytest.raises(TurboExportError, match="no CLS token"):
        apply_turbo(model, 8, semantic="cls")
    apply_turbo(model, 8, semantic="received")
    with torch.no_grad():
        assert model(pixel_values=torch.randn(1, 3, 32, 32)).last_hidden_state.shape[1] == 32


def test_hidden_states_and_attentions_have_the_merged_lengths():
    model = _model("CLIPVisionModel")
    apply_turbo(model, 8)
    with torch.no_grad():
        out = model(pixel_values=torch.randn(1, 3, 32, 32), output_hidden_states=True, output_attentions=True)
    assert [h.shape[1] for h in out.hidden_states] == [65, 57, 49, 41, 33]
    assert [a.shape[-1] for a in out.attentions] == [65, 57, 49, 41]


def test_pooling_head_with_size_bias_sees_merged_duplicates_as_the_originals():
    head = get_family("clip").load("random:tiny-siglip").model.head
    tokens = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(4))
    counts = torch.tensor([1, 3, 2, 1, 1, 4])
    full = tokens.repeat_interleave(counts, dim=1)  # duplicates, as if merged tokens had stayed apart
    size = counts.float().expand(2, 6).unsqueeze(-1)
    with torch.no_grad():
        torch.testing.assert_close(attention_pool(head, tokens, size), head(full), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(head(tokens), head(full), atol=1e-3)  # without the bias it would differ
        assert torch.equal(attention_pool(head, tokens, None), head(tokens))


def test_family_is_chosen_by_preset_and_by_checkpoint_class(tmp_path):
    assert image_encoder_for("random:tiny-siglip").name == "clip"
    assert image_encoder_for("random:tiny").name == "vit"
    folder = tmp_path / "clip-tower"
    transformers.CLIPVisionConfig(**VISION, architectures=["CLIPVisionModel"]).save_pretrained(folder)
    assert image_encoder_for(str(folder)).name == "clip"


def test_checkpoint_of_another_family_is_one_line_exit_2(tmp_path):
    folder = tmp_path / "bert"
    transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                            architectures=["BertModel"]).save_pretrained(folder)
    result = CliRunner().invoke(main, ["vit", "--model", str(folder), "--ratio", "4", "--no-bench"])
    assert result.exit_code == 2, result.output + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("turbo-export: error:") and "Traceback" not in result.stderr
    assert "BertModel checkpoint" in lines[0] and "SiglipVisionModel" in lines[0] and "ViTModel" in lines[0]


def test_flops_count_the_projection_and_the_pooling_head():
    from turbo_export.families.encoders import config_flops

    family = get_family("clip")
    clip, siglip = family.load("random:tiny-clip"), family.load("random:tiny-siglip")
    layers = [(65, 0)] * 4
    assert family.flops(clip, 32, layers) == config_flops(clip.model.config, 3, 32, layers) + 2 * 32 * 16
    w, m, final = 32, 64, 64 - 8
    merged = merge.tokens_per_layer(64, [2] * 4, protected=0)
    head = 2 * w * w * 2 + 2 * 2 * final * w * w + 2 * 2 * final * w + 2 * 2 * w * m
    assert family.flops(siglip, 32, merged) == config_flops(siglip.model.config, 3, 32, merged) + head


@pytest.mark.parametrize("preset", ["tiny-clip-zero-shot", "tiny-siglip-zero-shot"])
def test_zero_shot_export_and_validate(tmp_path, preset):
    out = tmp_path / preset
    result = CliRunner().invoke(main, ["clip", "--model", f"random:{preset}", "--labels", "a cat,a dog,a red car",
                                       "--ratio", "4", "--batch", "2", "--no-bench", "--out", str(out)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output + result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["family"] == "clip-zero-shot" and set(report["files"]) == {"baseline", "turbo", "text"}
    assert report["zero_shot"]["prompts"] == ["a photo of a cat", "a photo of a dog", "a photo of a red car"]
    assert 0.0 <= report["zero_shot_example"]["top1_agreement"] <= 1.0
    assert report["parity"]["max_abs_diff"] < 1e-4
    result = CliRunner().invoke(main, ["validate", str(out), "--data", DIGITS, "--limit", "4",
                                       "--json", str(tmp_path / "v.json")], catch_exceptions=False)
    assert result.exit_code == 0, result.output + result.stderr
    figures = json.loads((tmp_path / "v.json").read_text())
    assert figures["images"] == 4 and len(figures["labels"]) == 3
    assert 0.0 <= figures["zero_shot"]["top1_agreement"] <= 1.0
    assert set(figures["retrieval"]) == {"text_to_image_recall@1_agreement", "text_to_image_recall@5_agreement"}
    assert "zero-shot top-1 agreement" in result.output


@pytest.mark.parametrize("args, fragment", [
    (["--labels", " , "], "labels: empty"),
    (["--labels", "a cat,a cat"], "labels: repeated"),
    (["--labels", "a cat,a dog", "--template", "a photo"], "template"),
    (["--model", "random:tiny-clip", "--labels", "a cat"], "unknown preset"),
])
def test_zero_shot_bad_input_is_one_line_exit_2(args, fragment):
    base = ["clip", "--model", "random:tiny-clip-zero-shot", "--ratio", "4", "--no-bench"]
    result = CliRunner().invoke(main, base + args)
    assert result.exit_code == 2, result.output + result.stderr
    lines = result.stderr.strip().splitlines()  # at most the "loading ..." progress line before the error
    assert len(lines) <= 2 and lines[-1].startswith("turbo-export: error:") and fragment in lines[-1]
    assert "Traceback" not in result.stderr
