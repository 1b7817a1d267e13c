"""Stable Diffusion UNet: grid merge/restore, the UNet adapter (alpha = 0 is ToMe for SD), the semantic value,
export parity, the image pipeline, SSIM/PSNR and the CLI, on the tiny preset."""

import copy
import json
import math
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from turbo_export import apply_turbo, remove_turbo
from turbo_export.cli import main
from turbo_export.core import merge
from turbo_export.errors import TurboExportError
from turbo_export.metrics import psnr, ssim
from turbo_export.models.sd_presets import build_random_sd
from turbo_export.patch.unet import apply_turbo_unet, cross_attention_saliency, merged_blocks


@pytest.fixture(scope="module")
def tiny():
    return build_random_sd("tiny")


def unet_inputs(components, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2 * batch, 4, 8, 8, generator=g), torch.full((2 * batch,), 400.0),
            components.encode([""] * batch + ["a red cat on a table"] * batch))


# ---- merge functions -----------------------------------------------------------------------------------------

def test_grid_split_one_destination_per_cell():
    split = merge.grid_split(4, 6)
    assert split.b_idx.tolist() == [0, 2, 4, 12, 14, 16]  # top-left of each 2x2 cell
    assert sorted(split.a_idx.tolist() + split.b_idx.tolist()) == list(range(24))
    order = torch.cat([split.a_idx, split.b_idx])
    assert torch.equal(order[split.inverse], torch.arange(24))
    seeded = merge.grid_split(4, 6, seed=3)
    assert torch.equal(seeded.b_idx, merge.grid_split(4, 6, seed=3).b_idx)  # deterministic
    cells = sorted(((t // 6) // 2, (t % 6) // 2) for t in seeded.b_idx.tolist())
    assert cells == [(i, j) for i in range(2) for j in range(3)]
    odd = merge.grid_split(5, 5)  # incomplete border cells belong to A
    assert odd.b_idx.numel() == 4 and odd.a_idx.numel() == 21


def test_merge_then_restore_keeps_unmerged_and_copies_destinations():
    torch.manual_seed(0)
    split = merge.grid_split(6, 6)
    x = torch.randn(2, 36, 5)
    r = merge.grid_r(36, 0.5, split)
    assert r == 18
    plan = merge.grid_matching(x, split, r)
    merged = merge.merge_mean(plan, split, x)
    assert merged.shape == (2, 18, 5)
    restored = merge.unmerge_grid(plan, split, merged)
    for n in range(2):
        a, b = split.a_idx, split.b_idx
        sources = {int(a[s]): int(b[d]) for s, d in zip(plan.src_idx[n], plan.dst_idx[n])}
        for t in range(36):
            if t in sources:
                assert torch.equal(restored[n, t], restored[n, sources[t]])  # a source gets its destination
            elif t in b.tolist():
                group = [t] + [s for s, d in sources.items() if d == t]
                assert torch.allclose(restored[n, t], x[n, group].mean(0), atol=1e-6)  # plain mean
            else:
                assert torch.equal(restored[n, t], x[n, t])  # unmerged A token keeps its value


def tomesd_reference(x, w, h, r):
    """ToMe for SD's bipartite_soft_matching_random2d (no randomness: top-left destinations), transcribed."""
    B, N, _ = x.shape
    hsy, wsx = h // 2, w // 2
    rand_idx = torch.zeros(hsy, wsx, 1, dtype=torch.int64)
    idx_buffer_view = torch.zeros(hsy, wsx, 4, dtype=torch.int64)
    idx_buffer_view.scatter_(dim=2, index=rand_idx, src=-torch.ones_like(rand_idx))
    idx_buffer_view = idx_buffer_view.view(hsy, wsx, 2, 2).transpose(1, 2).reshape(hsy * 2, wsx * 2)
    idx_buffer = torch.zeros(h, w, dtype=torch.int64)
    idx_buffer[:hsy * 2, :wsx * 2] = idx_buffer_view
    rand_idx = idx_buffer.reshape(1, -1, 1).argsort(dim=1, stable=True)
    num_dst = hsy * wsx
    a_idx, b_idx = rand_idx[:, num_dst:, :], rand_idx[:, :num_dst, :]

    def split(t):
        C = t.shape[-1]
        return t.gather(1, a_idx.expand(B, N - num_dst, C)), t.gather(1, b_idx.expand(B, num_dst, C))

    metric = x / x.norm(dim=-1, keepdim=True)
    a, b = split(metric)
    scores = a @ b.transpose(-1, -2)
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx, src_idx = edge_idx[..., r:, :], edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)

    def do_merge(t):
        src, dst = split(t)
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce="mean")
        return torch.cat([unm, dst], dim=1)

    def do_unmerge(t):
        unm_len = unm_idx.shape[1]
        unm, dst = t[..., :unm_len, :], t[..., unm_len:, :]
        _, _, c = unm.shape
        src = dst.gather(dim=-2, index=dst_idx.expand(B, r, c))
        out = torch.zeros(B, N, c, dtype=t.dtype)
        out.scatter_(dim=-2, index=b_idx.expand(B, num_dst, c), src=dst)
        out.scatter_(dim=-2, index=a_idx.expand(B, a_idx.shape[1], 1).gather(1, unm_idx).expand(B, unm_len, c),
                     src=unm)
        out.scatter_(dim=-2, index=a_idx.expand(B, a_idx.shape[1], 1).gather(1, src_idx).expand(B, r, c), src=src)
        return out

    return do_merge, do_unmerge


def test_alpha_zero_merge_equals_tome_for_sd():
    torch.manual_seed(1)
    x = torch.randn(2, 64, 16)
    split = merge.grid_split(8, 8)
    r = merge.grid_r(64, 0.5, split)
    ref_merge, ref_unmerge = tomesd_reference(x, 8, 8, r)
    plan = merge.grid_matching(x, split, r, semantic=torch.rand(2, 64), alpha=0.0)
    merged = merge.merge_mean(plan, split, x)
    assert torch.allclose(merged, ref_merge(x), atol=1e-6)
    assert torch.allclose(merge.unmerge_grid(plan, split, merged), ref_unmerge(ref_merge(x)), atol=1e-6)


def test_semantic_value_changes_sources_not_destinations():
    torch.manual_seed(2)
    x = torch.randn(1, 64, 8)
    split = merge.grid_split(8, 8)
    semantic = torch.rand(1, 64)
    plain = merge.grid_matching(x, split, 16)
    turbo = merge.grid_matching(x, split, 16, semantic, alpha=10.0)
    redundancy, dst = merge.grid_redundancy(x, split)
    assert torch.equal(turbo.dst_idx, dst.gather(1, turbo.src_idx))
    assert set(plain.src_idx[0].tolist()) != set(turbo.src_idx[0].tolist())
    degree = redundancy - 10.0 * semantic[:, split.a_idx]
    chosen = degree[0, turbo.src_idx[0]]
    others = degree[0, turbo.unm_idx[0]]
    assert chosen.min() >= others.max()  # sources: the largest E = R - alpha * I


def test_topk_limit():
    merge.check_topk_limit(merge.grid_split(64, 64))  # 512 px: 3072 < 3840
    with pytest.raises(ValueError, match="TopK"):
        merge.check_topk_limit(merge.grid_split(96, 96))  # 768 px: 6912


# ---- UNet adapter --------------------------------------------------------------------------------------------

class ToMeSDBlock:
    """Reference: ToMe for SD's patched BasicTransformerBlock (merge attn1, attn2 and FFN with one plan)."""

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, **kwargs):
        x = hidden_states
        side = int(math.isqrt(x.shape[1]))
        m, u = tomesd_reference(x, side, side, int(x.shape[1] * self._ref_ratio))
        x = u(self.attn1(m(self.norm1(x)))) + x
        x = u(self.attn2(m(self.norm2(x)), encoder_hidden_states=encoder_hidden_states)) + x
        return u(self.ff(m(self.norm3(x)))) + x


def test_alpha_zero_unet_equals_tome_for_sd(tiny):
    inputs = unet_inputs(tiny)
    turbo = apply_turbo_unet(copy.deepcopy(tiny.unet), 0.5, alpha=0.0)
    reference = copy.deepcopy(tiny.unet)
    for name in merged_blocks(turbo):
        block = reference.get_submodule(name)
        block.__class__ = type("RefBlock", (ToMeSDBlock, type(block)), {})
        block._ref_ratio = 0.5
    with torch.no_grad():
        got, want, plain = turbo(*inputs).sample, reference(*inputs).sample, tiny.unet(*inputs).sample
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3)  # merging changed something


def test_patch_selection_and_exact_removal(tiny):
    inputs = unet_inputs(tiny)
    unet = copy.deepcopy(tiny.unet)
    with torch.no_grad():
        before = unet(*inputs).sample
        apply_turbo_unet(unet, 0.4, alpha=2.0)
        assert merged_blocks(unet) == ["down_blocks.0.attentions.0.transformer_blocks.0",
                                       "up_blocks.1.attentions.0.transformer_blocks.0",
                                       "up_blocks.1.attentions.1.transformer_blocks.0"]
        apply_turbo_unet(unet, 0.4, alpha=2.0, blocks="all")
        assert len(merged_blocks(unet)) == 4
        merged_out = unet(*inputs).sample
        remove_turbo(unet)
        after = unet(*inputs).sample
    assert not torch.equal(before, merged_out)
    assert torch.equal(before, after)
    assert merged_blocks(unet) == [] and not unet._forward_pre_hooks
    with pytest.raises(TurboExportError, match="apply_turbo_unet"):
        apply_turbo(unet, 0.5)
    for bad in (0.0, 0.8, -0.1):
        with pytest.raises(TurboExportError, match="ratio"):
            apply_turbo_unet(unet, bad)


def test_cross_attention_saliency_is_one_minus_start_token_probability(tiny):
    block = tiny.unet.down_blocks[0].attentions[0].transformer_blocks[0]
    attn = block.attn2
    torch.manual_seed(3)
    hidden = torch.randn(2, 64, attn.to_q.in_features)
    context = unet_inputs(tiny)[2]
    q = attn.head_to_batch_dim(attn.to_q(hidden))
    k = attn.head_to_batch_dim(attn.to_k(context))
    probs = attn.get_attention_scores(q, k).reshape(2, attn.heads, 64, -1)  # diffusers' own attention
    expected = 1.0 - probs[..., 0].mean(dim=1)
    got = cross_attention_saliency(attn, hidden, context)
    assert torch.allclose(got, expected, atol=1e-6)
    assert got.min() >= 0 and got.max() <= 1


# ---- metrics -------------------------------------------------------------------------------------------------

def test_psnr_and_ssim_known_answers():
    a = np.zeros((16, 16))
    b = np.full((16, 16), 0.1)
    assert psnr(a, b, data_range=1.0) == pytest.approx(20.0)
    assert psnr(a, a, data_range=1.0) == math.inf
    rng = np.random.default_rng(0)
    img = rng.random((24, 24, 3))
    assert ssim(img, img, data_range=1.0) == pytest.approx(1.0)
    # constant images: SSIM reduces to the luminance term (2 mu_a mu_b + c1) / (mu_a^2 + mu_b^2 + c1)
    c1 = (0.01 * 1.0) ** 2
    assert ssim(np.full((16, 16), 0.2), np.full((16, 16), 0.6), data_range=1.0) == pytest.approx(
        (2 * 0.2 * 0.6 + c1) / (0.04 + 0.36 + c1))
    assert ssim(img, 1.0 - img, data_range=1.0) < 0.0  # inverted structure, similar brightness
    with pytest.raises(ValueError, match="window"):
        ssim(np.zeros((8, 8)), np.zeros((8, 8)))


def test_ssim_matches_skimage():
    metrics = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(1)
    a = rng.random((32, 40, 3))
    b = np.clip(a + 0.1 * rng.standard_normal(a.shape), 0, 1)
    want = metrics.structural_similarity(a, b, data_range=1.0, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                         use_sample_covariance=False)
    assert ssim(a, b, data_range=1.0) == pytest.approx(want, abs=1e-9)


# ---- export, pipeline, CLI -----------------------------------------------------------------------------------

def _run(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def _export_tiny(tmp_path_factory, name: str, *options: str):
    """`sd-unet` on random:tiny (ratio 0.5, alpha 2, every block) into a fresh folder; (folder, CLI result)."""
    out = tmp_path_factory.mktemp(name) / f"tiny-{name}"
    result = _run(["sd-unet", "--model", "random:tiny", "--ratio", "0.5", "--alpha", "2", "--blocks", "all",
                   *options, "--out", str(out)])
    assert result.exit_code == 0, result.output + result.stderr
    return out, result


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return _export_tiny(tmp_path_factory, "sd", "--runs", "2")


@pytest.mark.slow
def test_sd_unet_cli_exports_validated_graphs(exported):
    out, result = exported
    assert sorted(os.listdir(out)) == ["baseline.onnx", "report.json", "turbo.onnx"]
    report = json.loads((out / "report.json").read_text())
    for key in ("family", "model", "ratio", "alpha", "flops", "files", "parity", "parity_baseline", "bench",
                "environment", "resolution", "latent_size", "blocks_merged", "tokens_per_block"):
        assert key in report
    assert report["family"] == "sd-unet" and report["ratio"] == 0.5 and report["latent_size"] == [8, 8]
    assert report["flops"]["baseline"] > report["flops"]["turbo"] > 0
    assert report["parity"]["max_abs_diff"] < 1e-4 and report["parity_baseline"]["max_abs_diff"] < 1e-4
    assert len(report["blocks_merged"]) == 4
    assert [b["tokens_after_merge"] for b in report["tokens_per_block"]] == [32, 32, 32, 8]
    assert report["bench"]["speedup"] > 0
    assert "FLOPs ratio" in result.output and "Validating ONNX model" in result.stderr


@pytest.mark.slow
def test_sd_generate_pipeline_matches_pytorch_and_writes_pngs(exported, tiny, tmp_path):
    from PIL import Image

    from turbo_export.backends import make_runner
    from turbo_export.backends.torch_runner import TorchRunner
    from turbo_export.families.sd import OUTPUT_NAMES, UNetGraph
    from turbo_export.pipelines.sd import generate

    out, _ = exported
    # the ONNX Turbo UNet inside the pipeline gives the PyTorch Turbo UNet's latents
    turbo = apply_turbo_unet(copy.deepcopy(tiny.unet), 0.5, alpha=2.0, blocks="all")
    names = {"sample": torch.zeros(2, 4, 8, 8), "timestep": torch.zeros(2),
             "encoder_hidden_states": torch.zeros(2, 77, 32)}
    ref = generate(TorchRunner(UNetGraph(turbo), names, OUTPUT_NAMES), tiny, "a cat", steps=3, seed=5,
                   progress=False)
    got = generate(make_runner(str(out / "turbo.onnx")), tiny, "a cat", steps=3, seed=5, progress=False)
    assert np.abs(got.latents - ref.latents).max() < 1e-3
    assert got.images.shape == (1, 64, 64, 3) and got.images.dtype == np.uint8

    png = tmp_path / "cat.png"
    result = _run(["sd-generate", str(out), "--prompt", "a cat", "--steps", "3", "--seed", "5", "--out", str(png)])
    assert result.exit_code == 0, result.output + result.stderr
    assert Image.open(png).size == (64 * 2 + 8, 64)
    assert Image.open(tmp_path / "cat-turbo.png").size == (64, 64)
    metrics = json.loads((tmp_path / "cat.json").read_text())
    assert metrics["images_ssim"] <= 1.0 and metrics["latents_psnr_db"] > 0
    assert "PSNR" in result.output and "weak evidence" in result.output
    timing = metrics["unet_timing"]  # both UNets interleaved, one timed call per step each
    assert timing["calls"] == 3 and len(timing["baseline_ms"]) == len(timing["turbo_ms"]) == 3
    assert timing["flops_ratio"] > 1.0 and "UNet per call, interleaved" in result.output


def _assert_one_line_error(result, *fragments):
    assert result.exit_code == 2, (result.exit_code, result.output, result.stderr)
    lines = [ln for ln in result.stderr.strip().splitlines() if not ln.startswith("loading ")]  # progress
    assert len(lines) == 1 and lines[0].startswith("turbo-export: error:"), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize("args, fragments", [
    (["--ratio", "0.8"], ("ratio", "(0, 0.75]")),
    (["--ratio", "0"], ("ratio",)),
    (["--ratio", "half"], ("ratio",)),
    (["--ratio", "0.5", "--resolution", "60"], ("resolution", "multiple of 16")),
])
def test_sd_unet_bad_input(args, fragments, tmp_path):
    result = _run(["sd-unet", "--model", "random:tiny", "--out", str(tmp_path / "x"), *args])
    _assert_one_line_error(result, *fragments)
    assert not (tmp_path / "x").exists()


def test_sd_bad_model_folder_and_prompt(tmp_path):
    (tmp_path / "text_encoder").mkdir()
    result = _run(["sd-unet", "--model", str(tmp_path), "--ratio", "0.5"])
    _assert_one_line_error(result, "unet/")
    result = _run(["sd-unet", "--model", "random:nope", "--ratio", "0.5"])
    _assert_one_line_error(result, "unknown preset")
    result = _run(["sd-generate", str(tmp_path), "--prompt", "  "])
    _assert_one_line_error(result, "prompt")
    result = _run(["sd-generate", str(tmp_path), "--prompt", "a cat"])
    _assert_one_line_error(result, "report.json")
    # the shared reader: another kind's export, and a report whose graph is missing, are one line each
    (tmp_path / "report.json").write_text('{"family": "vit", "files": {"baseline": "baseline.onnx"}}')
    _assert_one_line_error(_run(["sd-generate", str(tmp_path), "--prompt", "a cat"]), "family 'vit'", "sd-generate")
    (tmp_path / "report.json").write_text('{"family": "sd-unet", "files": {"baseline": "baseline.onnx"}}')
    _assert_one_line_error(_run(["sd-generate", str(tmp_path), "--prompt", "a cat"]), "baseline.onnx")


def test_local_diffusers_folder_loads(tiny, tmp_path):
    """A diffusers-layout folder (here written from the tiny preset, with a byte-level CLIP tokenizer) loads."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from turbo_export.models.sd_presets import load_sd

    chars = list(bytes_to_unicode().values())
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77).save_pretrained(tmp_path / "tokenizer")
    torch.manual_seed(0)
    CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=77, bos_token_id=len(vocab) - 2,
                                 eos_token_id=len(vocab) - 1)).save_pretrained(tmp_path / "text_encoder")
    tiny.unet.save_pretrained(tmp_path / "unet")
    tiny.vae.save_pretrained(tmp_path / "vae")
    loaded = load_sd(str(tmp_path))
    assert type(loaded.unet).__name__ == "UNet2DConditionModel" and loaded.resolution == 64
    assert loaded.encode(["a cat", ""]).shape == (2, 77, 32)
    for name, p in tiny.unet.state_dict().items():
        assert torch.equal(p, loaded.unet.state_dict()[name])


# ---- --merge-impl plugin (TurboMerge / TurboUnmerge nodes) and --precision fp16 ---------------------------------

def _grid_inputs(split, batch=2, channels=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = split.height * split.width
    return (torch.randn(batch, tokens, channels, generator=g), torch.randn(batch, tokens, channels, generator=g),
            torch.rand(batch, tokens, generator=g))


@pytest.mark.parametrize("height,width,seed,alpha", [(6, 8, None, 0.0), (6, 8, 3, 1.5), (5, 7, 1, 0.7)])
def test_split_op_equals_grid_merge_and_restore(height, width, seed, alpha):
    """turbo::merge / unmerge with the 2x2-grid split, all-ones sizes, nothing protected == merge_mean /
    unmerge_grid: the same plan and values; only the unmerged A rows come in A order instead of descending E."""
    from turbo_export.core import plugin_ops

    plugin_ops.import_turbo_plugin()
    from turbo_plugin import reference

    split = merge.grid_split(height, width, seed)
    metric, h, semantic = _grid_inputs(split)
    tokens = height * width
    r = merge.grid_r(tokens, 0.5, split)
    plan = merge.grid_matching(metric, split, r, semantic, alpha)
    expected = merge.merge_mean(plan, split, h)
    indices = (split.a_idx.int(), split.b_idx.int())
    ones = h.new_ones(2, tokens, 1)
    got, size, got_plan = plugin_ops.plugin_merge(h, ones, metric, semantic, r, alpha, protected=0, split=indices)
    assert torch.equal(got_plan.src_idx, plan.src_idx) and torch.equal(got_plan.dst_idx, plan.dst_idx)
    assert torch.equal(got_plan.unm_idx, plan.unm_idx.sort(dim=-1)[0])
    num_unm = tokens - split.b_idx.numel() - r
    to_a_order = plan.unm_idx.argsort(dim=-1).unsqueeze(-1).expand(-1, -1, h.shape[-1])
    assert torch.equal(got, torch.cat([expected[:, :num_unm].gather(1, to_a_order), expected[:, num_unm:]], dim=1))
    counts = torch.ones(2, split.b_idx.numel()).scatter_add(1, plan.dst_idx, torch.ones(2, r))
    assert torch.equal(size[:, num_unm:, 0], counts) and torch.equal(size[:, :num_unm], ones[:, :num_unm])
    # restore inverts the node's order exactly: the same tokens as unmerge_grid of the standard merge
    restored = plugin_ops.plugin_unmerge(got_plan, got, tokens, split=indices)
    assert torch.equal(restored, merge.unmerge_grid(plan, split, expected))
    # the numpy statement of the nodes (what ONNX Runtime runs) agrees on the grid split
    ref = reference.turbo_merge(h.numpy(), ones.numpy(), metric.numpy(), semantic.numpy(),
                                *(i.numpy() for i in indices), r, alpha, 0)
    np.testing.assert_allclose(ref[0], got.numpy(), atol=1e-6)
    for mine, theirs in zip(ref[2:], got_plan):
        np.testing.assert_array_equal(mine, theirs.numpy())
    np.testing.assert_array_equal(reference.turbo_unmerge(ref[0], *ref[2:], *(i.numpy() for i in indices)),
                                  restored.numpy())


def test_plugin_unet_eager_equals_standard_ops(tiny):
    inputs = unet_inputs(tiny)
    out = {}
    for impl in ("onnx", "plugin"):
        unet = apply_turbo_unet(copy.deepcopy(tiny.unet), 0.5, alpha=2.0, blocks="all", merge_impl=impl)
        with torch.no_grad():
            out[impl] = unet(*inputs, return_dict=False)[0]
    with torch.no_grad():
        base = tiny.unet(*inputs, return_dict=False)[0]
    # the same tokens after every restore; self-attention sums its keys in another order (A order), hence not bitwise
    assert (out["plugin"] - out["onnx"]).abs().max() < 1e-5
    assert (out["plugin"] - base).abs().max() > 1e-2  # the merge really happens
    with pytest.raises(TurboExportError, match="merge-impl"):
        apply_turbo_unet(copy.deepcopy(tiny.unet), 0.5, merge_impl="triton")


@pytest.fixture(scope="module")
def plugin_exported(tmp_path_factory):
    return _export_tiny(tmp_path_factory, "sd-plugin", "--merge-impl", "plugin")


@pytest.mark.slow
def test_sd_unet_plugin_cli_one_node_per_merge_validated_with_custom_ops(plugin_exported):
    import onnx

    from turbo_export.backends.trt_lint import lint_file

    out, result = plugin_exported
    report = json.loads((out / "report.json").read_text())
    assert report["merge_impl"] == "plugin" and report["precision"] == "fp32"
    assert report["parity"]["ok"] and report["parity"]["max_abs_diff"] < 1e-4  # ONNX Runtime + Python nodes
    assert report["bench"] is None and "benchmark skipped" in result.stderr
    nodes = [n.op_type for n in onnx.load(str(out / "turbo.onnx"), load_external_data=False).graph.node]
    merges = 3 * len(report["blocks_merged"])  # attn1, attn2, ff in every merged block
    assert nodes.count("TurboMerge") == merges == nodes.count("TurboUnmerge") == 12
    assert "TopK" not in nodes and "ScatterElements" not in nodes
    lint = lint_file(str(out / "turbo.onnx"))
    assert lint.ok and {f.op_type for f in lint.findings} == {"TurboMerge", "TurboUnmerge"}
    png = out.parent / "cat.png"  # sd-generate opens the plugin graph with the Python nodes
    result = _run(["sd-generate", str(out), "--prompt", "a cat", "--steps", "2", "--out", str(png)])
    assert result.exit_code == 0, result.output + result.stderr
    assert json.loads((out.parent / "cat.json").read_text())["images_psnr_db"] > 0


@pytest.mark.slow
def test_sd_plugin_graph_equals_standard_graph_and_pytorch(plugin_exported, exported, tiny):
    from turbo_export.backends import make_runner
    from turbo_export.export.parity import torch_outputs
    from turbo_export.families.base import GraphSpec
    from turbo_export.families.sd import OUTPUT_NAMES, SDOptions, UNetGraph, example_inputs, make_turbo

    inputs = example_inputs(tiny, (8, 8), 1)  # both exports' example input
    feed = {k: v.numpy() for k, v in inputs.items()}
    options = SDOptions(ratio=0.5, alpha=2.0, blocks="all")  # both exports' settings
    standard = GraphSpec("turbo", UNetGraph(make_turbo(copy.deepcopy(tiny.unet), options)), inputs, OUTPUT_NAMES)
    got = {"onnx": make_runner(str(exported[0] / "turbo.onnx")).run(feed)["noise_pred"],
           "plugin": make_runner(str(plugin_exported[0] / "turbo.onnx")).run(feed)["noise_pred"]}
    torch_ref = torch_outputs(standard, inputs)[0]
    np.testing.assert_allclose(got["plugin"], got["onnx"], atol=1e-5)
    np.testing.assert_allclose(got["plugin"], torch_ref, atol=1e-5)
    np.testing.assert_allclose(got["onnx"], torch_ref, atol=1e-5)


FLOAT_IO = {"ScatterElements": ((0, 2), (0,)), "TurboMerge": ((0, 1, 2, 3), (0, 1)), "TurboUnmerge": ((0,), (0,))}


def float32_islands(path: str) -> bytes:
    """The fp16 graph with every ScatterElements(reduction='add') and Turbo node computed in float32 between Casts:
    ONNX Runtime's CPU provider has no fp16 kernel for the first, the Python nodes take float32 only."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(path)
    nodes = []
    for n in model.graph.node:
        io = FLOAT_IO.get(n.op_type)
        if io is None or (n.op_type == "ScatterElements"
                          and not any(a.name == "reduction" and a.s == b"add" for a in n.attribute)):
            nodes.append(n)
            continue
        for i in io[0]:
            nodes.append(helper.make_node("Cast", [n.input[i]], [f"{n.name}_in{i}_f32"], to=TensorProto.FLOAT))
            n.input[i] = f"{n.name}_in{i}_f32"
        after = []
        for i in io[1]:
            after.append(helper.make_node("Cast", [f"{n.name}_out{i}_f32"], [n.output[i]], to=TensorProto.FLOAT16))
            n.output[i] = f"{n.name}_out{i}_f32"
        nodes += [n, *after]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model.SerializeToString()


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["onnx", "plugin"])
def test_fp16_sd_graph_matches_fp32_model(impl, tiny, tmp_path):
    import onnx
    import onnxruntime as ort

    from turbo_export.backends.trt_lint import lint_file
    from turbo_export.core.plugin_ops import import_turbo_plugin
    from turbo_export.export.job import FP16_ATOL, half_graph, set_tolerances
    from turbo_export.export.onnx import export_onnx
    from turbo_export.export.parity import torch_outputs
    from turbo_export.families.base import GraphSpec
    from turbo_export.families.sd import OUTPUT_NAMES, SDOptions, UNetGraph, example_inputs, make_turbo
    from turbo_export.metrics import compare_outputs

    inputs = example_inputs(tiny, (8, 8), 1)
    options = SDOptions(ratio=0.5, alpha=2.0, blocks="default", merge_impl=impl)
    graphs = {"turbo": GraphSpec("turbo", UNetGraph(make_turbo(copy.deepcopy(tiny.unet), options)), inputs,
                                 OUTPUT_NAMES)}
    set_tolerances(graphs, 1e-4, "fp16", "tensorrt")
    graph = graphs["turbo"]
    assert graph.atol == FP16_ATOL
    path = export_onnx(half_graph(graph), str(tmp_path / "turbo.onnx"))  # half_graph deep-copies the patched UNet
    model = onnx.load(path, load_external_data=False)
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for i in model.graph.input)
    merges = 3 * len(merged_blocks(graph.module.unet))  # blocks="default": the 3 level-0 blocks of the tiny UNet
    assert merges == 9
    assert sum(n.op_type == "TurboMerge" for n in model.graph.node) == (merges if impl == "plugin" else 0)
    assert lint_file(path).ok
    import_turbo_plugin()
    from turbo_plugin import ort_ops

    session = ort.InferenceSession(float32_islands(path), ort_ops.session_options(),
                                   providers=["CPUExecutionProvider"])
    got = session.run(None, {k: v.half().numpy() for k, v in inputs.items()})[0]
    assert got.dtype == np.float16
    check = compare_outputs(OUTPUT_NAMES, [got.astype(np.float32)], torch_outputs(graph, inputs), FP16_ATOL)[0]
    assert check.ok and check.max_abs_diff > 0, check  # within the fp16 tolerance, and really half precision


@pytest.mark.parametrize("args, fragments", [
    (["--precision", "fp16"], ("precision: fp16 needs --backend tensorrt",)),
    (["--merge-impl", "plugin", "--backend", "tensorrt"], ("backend tensorrt:", "--backend onnxruntime works")),
    (["--precision", "fp16", "--merge-impl", "plugin", "--backend", "tensorrt"], ("backend tensorrt:",)),
])
def test_sd_unet_precision_and_merge_impl_errors(args, fragments, tmp_path):
    from turbo_export.backends import tensorrt_unavailable_reason

    if "tensorrt" in args and tensorrt_unavailable_reason() is None:
        pytest.skip("TensorRT and a GPU are present")
    result = _run(["sd-unet", "--model", "random:tiny", "--ratio", "0.5", "--out", str(tmp_path / "x"), *args])
    _assert_one_line_error(result, *fragments)
    assert not (tmp_path / "x").exists() and "loading" not in result.stderr  # stops before loading the model
    bad = CliRunner().invoke(main, ["sd-unet", "--model", "random:tiny", "--ratio", "0.5", "--merge-impl", "x"])
    assert bad.exit_code == 2 and "merge-impl" in bad.output
