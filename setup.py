from setuptools import find_packages, setup

# xbm-export --format onnx (onnx + onnxscript: torch's ONNX exporter) and ONNX models in
# xbm-index/xbm-search (onnxruntime); the tests use them too
SERVE = ["onnx>=1.16", "onnxruntime>=1.17", "onnxscript>=0.1"]
# timm backbones (MODEL.BACKBONE.NAME timm:<name>): timm 1.0 is the first stable API (create_model's
# pretrained_cfg, resolve_data_config, set_grad_checkpointing, param_groups_layer_decay); safetensors reads the
# .safetensors weight files timm publishes, huggingface_hub finds them in the local cache (PRETRAINED hub)
TIMM = ["timm>=1.0", "safetensors>=0.4", "huggingface_hub>=0.20"]

setup(
    name="xbm",
    version="0.1.0",
    description="Deep metric learning with a cross-batch memory: XBM, XBN and AXBN",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["xbm", "xbm.*"]),
    install_requires=[line.strip() for line in open("requirements.txt") if line.strip() and not line.startswith("#")],
    extras_require={
        # Exactly one faiss: both packages install the module `faiss` and overwrite each other's
        # files. Without either, evaluation searches with torch (and says so once).
        "cpu": ["faiss-cpu>=1.7.4"],
        # faiss with GPU indexes (CUDA 12 build with its own CUDA runtime wheels)
        "gpu": ["faiss-gpu>=1.15"],
        # pytest-xdist: make test runs on both cores; submitit: the cluster launchers' tests;
        # SERVE: the export tests; TIMM: the timm backbones' tests
        "dev": ["pytest>=7", "pytest-xdist>=3", "submitit>=1.5", *SERVE, *TIMM],
        # scripts/sweep.py --launcher slurm / submitit-local and scripts/submit.py
        "cluster": ["submitit>=1.5"],
        # peers measured side by side in benchmarks/
        "bench": ["pytorch-metric-learning>=2.3"],
        "serve": SERVE,
        # MODEL.BACKBONE.NAME timm:<name>: every timm model (ViT, DINO, DINOv2, ConvNeXt, ...) as a backbone
        "timm": TIMM,
    },
    entry_points={
        "console_scripts": [
            "xbm-train=xbm.cli:train_main",
            "xbm-eval=xbm.cli:eval_main",
            "xbm-index=xbm.serving.cli:index_main",
            "xbm-search=xbm.serving.cli:search_main",
            "xbm-export=xbm.serving.cli:export_main",
        ]
    },
)
