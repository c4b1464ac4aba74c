from pathlib import Path

from setuptools import find_packages, setup

version = {}
for line in Path("timm_peft/__init__.py").read_text().splitlines():
    if line.startswith("__version__"):
        exec(line, version)

setup(
    name="timm_peft",
    version=version["__version__"],
    description="Parameter-efficient fine-tuning (VPT, E2VPT, LION, SSF, baselines) for timm models",
    long_description=Path("README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["timm_peft", "timm_peft.*"]),
    package_data={"timm_peft": ["paper_results.json"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1",
        "torchvision",
        "timm>=1.0.21",
        "safetensors>=0.4",
        "huggingface_hub>=1.0",
        "tqdm",
    ],
    extras_require={"dev": ["pytest>=7", "hypothesis>=6", "pyyaml", "datasets", "onnx", "onnxscript",
                            "peft>=0.13", "ray[serve]"],
                    "serve": ["ray[serve]"]},
    entry_points={"console_scripts": ["timm-peft=timm_peft.cli:main"]},
    license="Apache-2.0",
)
