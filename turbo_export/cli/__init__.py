"""The `turbo-export` command line: a registry of thin click commands (parse, call the library, print).

Each command lives in the module of its topic and imports only ``common``; this module adds them to the group,
so no command module imports another.
"""

from __future__ import annotations

import os

import click

# Before torch is imported: its OpenMP threads otherwise keep spinning after each call, and on a machine with few
# cores they take those cores from whatever runs next. The interleaved benchmarks time PyTorch beside ONNX Runtime
# (whose threads do not spin, see backends/ort.py); on this project's loaded 2-core machine a tiny ViT call took a
# median 843 ms with spinning threads and 7 ms without.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from turbo_export.cli import export, sd, serve, trt, validate
from turbo_export.cli.common import OneLineErrorGroup, quiet_option

COMMANDS: list[click.Command] = [
    export.vit, export.clip, export.blip, export.blip2, sd.sd_unet, sd.sd_generate, validate.validate_cmd, validate.sweep_cmd,
    validate.visualize_cmd, trt.check_trt, trt.compare, serve.serve, serve.triton_repo, export.list_presets,
]


@click.group(cls=OneLineErrorGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="turbo-export")
@quiet_option
def main() -> None:
    """Bake Turbo token merging into ONNX graphs (and TensorRT engines) and measure it honestly."""


for _command in COMMANDS:
    main.add_command(_command)

if __name__ == "__main__":
    main()
