"""``python -m fused_dropout --info``: what this build of the extension is and runs on."""

import argparse
import platform
import sys


def info() -> str:
    import torch

    import fused_dropout
    from fused_dropout import _C

    try:
        from fused_dropout import _build_info as built
    except ImportError:
        built = None
    lines = [
        f"fused_dropout {fused_dropout.__version__} ({fused_dropout.__file__})",
        f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda})",
        f"built against torch {built.TORCH_VERSION} (CUDA {built.TORCH_CUDA_VERSION})" if built else "build info: none",
        f"CUDA kernels: {'yes' if _C.with_cuda else 'no'}"
        + (f", arch list {built.CUDA_ARCH_LIST}" if built and built.WITH_CUDA else "")
        + (f" ({built.CPU_ONLY_REASON})" if built and built.CPU_ONLY_REASON else ""),
        f"CUDA device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}",
        f"CPU inner loops: {_C.cpu_loops} ({platform.machine()}, {torch.get_num_threads()} threads)",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fused_dropout", description=__doc__)
    parser.add_argument("--info", action="store_true", help="print the build configuration and exit")
    args = parser.parse_args(argv)
    if not args.info:
        parser.print_help()
        return 0
    print(info())
    return 0


if __name__ == "__main__":
    sys.exit(main())
