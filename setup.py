from setuptools import find_packages, setup

setup(
    name="lora-vqa",
    version="0.1.0",
    description="From-scratch LoRA for timm DINOv2 ViTs, and the VQA model it fine-tunes",
    packages=find_packages(include=["lora", "lora.*", "vit", "vit.*", "vqa", "vqa.*"]),
    python_requires=">=3.10",
    install_requires=[
        # torch and torchvision must be released together: a torchvision built for another torch fails to import.
        "torch==2.14.1",
        "torchvision==0.29.1",
        "timm>=1.0.15,<2",
        "safetensors>=0.4",
        "pyyaml>=6",
        "tqdm>=4.60",
        "numpy>=1.24",
        "pillow>=10",
    ],
    # pytest-xdist: the suite runs in two processes (pytest.ini), which keeps it inside CI's 5 minutes on 2 cores;
    # in one, a core sits idle through every subprocess's imports and every single-threaded test.
    extras_require={"test": ["pytest>=8", "hypothesis>=6.100", "pytest-xdist>=3.5"]},
)
