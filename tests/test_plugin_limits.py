"""The plugin kernel's size limit: refused at export with one line, whatever the family."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from turbo_export.cli import main
from turbo_export.core import plugin_ops
from turbo_export.errors import TurboExportError


def test_limit_admits_vit_b_and_refuses_stable_diffusion_512():
    plugin_ops.check_plugin_sizes(99, 98)  # ViT-B/16 at 224 px (and ViT-L/16)
    plugin_ops.check_plugin_sizes(129, 128)  # DINOv2-S/14 at 224 px
    plugin_ops.check_plugin_sizes(289, 288)  # ViT-L/14 at 336 px, BLIP at 384 px
    plugin_ops.check_plugin_sizes(plugin_ops.PLUGIN_MAX_TOKENS_PER_SIDE, plugin_ops.PLUGIN_MAX_TOKENS_PER_SIDE)
    # SD 1.5 at 512 px: 64 x 64 latent, 2x2 grid -> 3072 A / 1024 B tokens of width 320
    with pytest.raises(TurboExportError) as err:
        plugin_ops.check_plugin_sizes(3072, 1024, (2, 4096, 320))
    message = str(err.value)
    assert "\n" not in message and "[2, 4096, 320]" in message and "3072 A / 1024 B" in message
    assert f"limit of {plugin_ops.PLUGIN_MAX_TOKENS_PER_SIDE} per side" in message
    assert "--merge-impl onnx" in message
    with pytest.raises(TurboExportError, match="merge-impl plugin"):  # one side over is enough
        plugin_ops.check_plugin_sizes(10, plugin_ops.PLUGIN_MAX_TOKENS_PER_SIDE + 1)


def test_plugin_merge_refuses_the_sd_512_grid_before_computing_anything():
    from turbo_export.core import merge

    grid = merge.grid_split(64, 64)  # the UNet's finest level at 512 px
    x = torch.zeros(2, 4096, 320)
    with pytest.raises(TurboExportError, match=r"tokens \[2, 4096, 320\] splits into 3072 A / 1024 B"):
        plugin_ops.plugin_merge(x, torch.ones(2, 4096, 1), x, None, 2048, 0.0, protected=0,
                                split=(grid.a_idx, grid.b_idx))


def test_plugin_merge_checks_the_split_it_is_given(monkeypatch):
    monkeypatch.setattr(plugin_ops, "PLUGIN_MAX_TOKENS_PER_SIDE", 8)
    x = torch.randn(1, 17, 4)
    with pytest.raises(TurboExportError, match="9 A / 8 B"):  # alternate split of 17 tokens
        plugin_ops.plugin_merge(x, torch.ones(1, 17, 1), x, None, 2, 0.0)
    split = (torch.arange(0, 12), torch.arange(12, 17))  # a UNet-style split: 12 A / 5 B
    with pytest.raises(TurboExportError, match="12 A / 5 B"):
        plugin_ops.plugin_merge(x, torch.ones(1, 17, 1), x, None, 2, 0.0, protected=0, split=split)
    plugin_ops.plugin_merge(x[:, :16], torch.ones(1, 16, 1), x[:, :16], None, 2, 0.0)  # 8 / 8: at the limit


class _OneMerge(torch.nn.Module):
    def forward(self, x):
        return plugin_ops.plugin_merge(x, torch.ones_like(x[..., :1]), x, None, 2, 0.0)[0]


def test_export_raises_the_user_error_not_torch_exports_wrapper(monkeypatch, tmp_path):
    from turbo_export.export.onnx import export_onnx
    from turbo_export.families.base import GraphSpec

    spec = GraphSpec("turbo", _OneMerge(), {"x": torch.randn(1, 17, 4)}, ["y"])
    export_onnx(spec, str(tmp_path / "ok.onnx"))  # 9 / 8 tokens: under the real limit
    monkeypatch.setattr(plugin_ops, "PLUGIN_MAX_TOKENS_PER_SIDE", 8)
    with pytest.raises(TurboExportError, match="merge-impl plugin: a merge of tokens \\[1, 17, 4\\]"):
        export_onnx(spec, str(tmp_path / "over.onnx"))
    assert not (tmp_path / "over.onnx").exists()


def test_sd_unet_plugin_export_over_the_limit_is_one_line_exit_2(monkeypatch, tmp_path):
    # random:tiny merges an 8 x 8 latent (48 A / 16 B tokens); a lowered limit stands in for SD 512 px
    monkeypatch.setattr(plugin_ops, "PLUGIN_MAX_TOKENS_PER_SIDE", 32)
    out = tmp_path / "x"
    result = CliRunner().invoke(main, ["sd-unet", "--model", "random:tiny", "--ratio", "0.5", "--merge-impl",
                                       "plugin", "--no-bench", "--out", str(out)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) >= 1 and "48 A / 16 B" in lines[-1] and "--merge-impl onnx" in lines[-1]
    assert "Traceback" not in result.output and "exporting" not in result.output  # refused before any export
    assert not out.exists()  # nothing half-written


def test_vit_plugin_export_over_the_limit_is_refused_before_exporting(monkeypatch, tmp_path):
    monkeypatch.setattr(plugin_ops, "PLUGIN_MAX_TOKENS_PER_SIDE", 4)  # random:tiny: 65 tokens -> 33 A / 32 B
    out = tmp_path / "v"
    result = CliRunner().invoke(main, ["vit", "--model", "random:tiny", "--ratio", "2", "--merge-impl", "plugin",
                                       "--no-bench", "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "33 A / 32 B" in result.output and "exporting" not in result.output
    assert not out.exists()
