from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROSA_SOURCE = "src/kop_triton/_rosa.c"


class BuildRosa(build_ext):
    """Builds ROSA's C helper (a plain shared library loaded through ctypes, no Python API), and
    turns a missing or failing C compiler into one clear message instead of a compiler trace."""

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:  # CCompilerError, CompileError, LinkError, PlatformError
            raise SystemExit(
                f"kop-triton: cannot build ROSA's C helper {ROSA_SOURCE} ({type(e).__name__}: "
                f"{str(e).strip().splitlines()[-1] if str(e).strip() else 'no compiler output'}). "
                "It needs a C compiler (gcc or clang; on Debian/Ubuntu: apt-get install gcc), "
                "then rerun `make install`.") from None


setup(
    name="kop-triton",
    version="0.1.0",
    description="K-Operators: linear-time sequence mixing with fused Triton kernels",
    python_requires=">=3.10",
    package_dir={"kop_triton": "src/kop_triton", "kop_triton.kernels": "kernels"},
    packages=["kop_triton", "kop_triton.ops", "kop_triton.kernels"],
    ext_modules=[Extension("kop_triton._rosa", sources=[ROSA_SOURCE], extra_compile_args=["-O3", "-std=c99"])],
    cmdclass={"build_ext": BuildRosa},
    install_requires=["torch>=2.4", "numpy", "safetensors", "tqdm"],
    extras_require={
        "triton": ["triton>=3.4"],
        "sentencepiece": ["sentencepiece"],
        "bench": ["matplotlib"],
        "test": ["pytest", "hypothesis", "pytest-xdist"],
        # kop_triton.hf; tested with transformers 5.17.0 (the GPU machine's) and 5.23.0 (the newest; make
        # install's), lm-eval 0.4.13 HFLM and peft 0.21.2 in the tests
        "hf": ["transformers>=5.17,<5.24"],
    },
    entry_points={
        "console_scripts": [
            "kop-train=kop_triton.cli:kop_train",
            "kop-eval=kop_triton.cli:kop_eval",
            "kop-generate=kop_triton.cli:kop_generate",
            "kop-convert=kop_triton.cli:kop_convert",
        ]
    },
)
