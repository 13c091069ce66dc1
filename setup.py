from setuptools import setup

setup(
    name="kop-triton",
    version="0.1.0",
    description="K-Operators: linear-time sequence mixing with fused Triton kernels",
    python_requires=">=3.10",
    package_dir={"kop_triton": "src/kop_triton", "kop_triton.kernels": "kernels"},
    packages=["kop_triton", "kop_triton.ops", "kop_triton.kernels"],
    install_requires=["torch>=2.4", "numpy", "safetensors", "tqdm"],
    extras_require={
        "triton": ["triton>=3.4"],
        "sentencepiece": ["sentencepiece"],
        "bench": ["matplotlib"],
        "test": ["pytest", "hypothesis", "pytest-xdist"],
        # kop_triton.hf; tested with transformers 5.23 (lm-eval 0.4.13 HFLM in the tests)
        "hf": ["transformers>=5.23,<5.24"],
    },
    entry_points={
        "console_scripts": [
            "kop-train=kop_triton.train:main",
            "kop-eval=kop_triton.eval:main",
            "kop-generate=kop_triton.generate:main",
            "kop-convert=kop_triton.convert:main",
        ]
    },
)
